"""`moelab eval lm` and `moelab eval choice` checked against hand computations on tiny inputs, and
the lm-evaluation-harness adapter against moelab's own scoring on a local task."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moelab.checkpoint.model_files import save_model
from moelab.cli import main
from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.data import train_tokenizer
from moelab.data.document import Document
from moelab.eval.choice import Question, evaluate_choices, load_tasks, loglikelihoods, mean_stderr
from moelab.eval.lm import bootstrap_ratio, document_nll, summarize
from moelab.model import build_model

TEXTS = ["the cat sat on the mat and the dog sat on the log",
         "one two three four five six seven eight nine ten",
         "def f(x):\n    return x + 1\n", "alpha beta gamma delta epsilon"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalmodel") / "m"
    tok = train_tokenizer(TEXTS * 20, 300, seed=0)
    cfg = ModelConfig(vocab_size=300, d_model=32, num_layers=2, max_seq_len=16, dense_ffn_dim=64,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                      moe=MoEConfig(num_experts=4, expert_ffn_dim=32, router=RouterConfig(top_k=2)))
    torch.manual_seed(0)
    save_model(build_model(cfg), d)
    tok.save(d / "tokenizer.json")
    return d


def _load(d):
    from moelab.loading import load, load_tokenizer

    return load(d), load_tokenizer(d)


def test_document_nll_equals_cross_entropy_by_hand(model_dir):
    model, tok = _load(model_dir)
    docs = [Document(t, dom, str(i)) for i, (t, dom) in enumerate(zip(TEXTS, ["a", "a", "b", "b"]))]
    rows = document_nll(model, tok, docs, seq_len=8, batch_size=3)
    for (dom, nll, n), d in zip(rows, docs):
        ids = tok.encode(d.text) + [tok.eos_id]
        want, count = 0.0, 0
        for s in range(0, len(ids), 8):  # windows of 8; each window's first token is not scored
            w = torch.tensor([ids[s:s + 8]])
            if w.shape[1] < 2:
                continue
            with torch.no_grad():
                logits = model(w).logits[0, :-1]
            want += float(F.cross_entropy(logits, w[0, 1:], reduction="sum"))
            count += w.shape[1] - 1
        assert n == count and nll == pytest.approx(want, rel=1e-5), d.text
        assert dom == d.domain


def test_summary_is_a_token_mean_and_the_bootstrap_is_the_percentile_interval():
    rows = [("a", 10.0, 5), ("a", 2.0, 4), ("b", 9.0, 3), ("b", 3.0, 3), ("b", 6.0, 6)]
    r = summarize(rows, resamples=500, seed=3)
    assert r["overall"]["loss"] == pytest.approx(30 / 21)
    assert r["domains"]["a"]["loss"] == pytest.approx(12 / 9) and r["domains"]["b"]["loss"] == pytest.approx(18 / 12)
    assert r["domains"]["a"]["ppl"] == pytest.approx(math.exp(12 / 9))
    # the interval by hand: the same resample indices, the ratio, the percentiles
    rng = np.random.default_rng(3)
    nll, n = np.array([10.0, 2, 9, 3, 6]), np.array([5.0, 4, 3, 3, 6])
    idx = rng.integers(0, 5, size=(500, 5))
    want = np.percentile(nll[idx].sum(1) / n[idx].sum(1), [2.5, 97.5])
    assert r["overall"]["loss_ci95"] == pytest.approx(list(want))
    lo, hi = r["overall"]["loss_ci95"]
    assert lo <= r["overall"]["loss"] <= hi
    same = bootstrap_ratio(np.array([2.0, 2.0, 2.0]), np.array([1.0, 1.0, 1.0]), 200, np.random.default_rng(0))
    assert same == (2.0, 2.0)  # identical documents: no uncertainty


def test_loglikelihood_of_a_continuation_by_hand(model_dir):
    model, tok = _load(model_dir)
    ctx, cont = "the cat sat", " on the mat"
    (ll, greedy), = loglikelihoods(model, tok, [(ctx, cont)], max_len=16)
    c, x = tok.encode(ctx), tok.encode(cont)
    ids = torch.tensor([c + x])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1]).logits[0].float(), -1)
    want = sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(x))
    assert ll == pytest.approx(want, rel=1e-5)
    assert greedy == all(int(logp[len(c) - 1 + j].argmax()) == t for j, t in enumerate(x))
    # batched with other lengths (left padding) gives the same number
    many = loglikelihoods(model, tok, [("one two", " three"), (ctx, cont), ("alpha", " beta gamma")], 16, batch_size=3)
    assert many[1][0] == pytest.approx(ll, rel=1e-5, abs=1e-5)


def test_accuracy_and_stderr_by_hand(model_dir, tmp_path):
    model, tok = _load(model_dir)
    qs = [Question("t", "the cat sat", [" on the mat", " five", " gamma delta epsilon"], 0),
          Question("t", "one two", [" three", " mat"], 1), Question("u", "alpha", [" beta", " x"], 0)]
    r = evaluate_choices(model, tok, qs, 16)
    acc, acc_norm = [], []
    for q in qs:
        ll = [loglikelihoods(model, tok, [(q.context, c)], 16)[0][0] for c in q.choices]
        acc.append(float(int(np.argmax(ll)) == q.answer))
        acc_norm.append(float(int(np.argmax([v / len(c) for v, c in zip(ll, q.choices)])) == q.answer))
    assert r["t"]["acc"] == pytest.approx(np.mean(acc[:2])) and r["t"]["acc_norm"] == pytest.approx(np.mean(acc_norm[:2]))
    assert r["t"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2) and r["u"]["n"] == 1
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(math.sqrt(0.25 / 4))  # s.d. (n-1) / sqrt(n)
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"task": "t", "context": "a", "choices": ["b"], "answer": 0}\n')
    with pytest.raises(Exception, match="at least 2"):
        load_tasks(path)
    path.write_text('{"context": "a", "choices": ["b", "c"], "answer": 2}\n')
    with pytest.raises(Exception, match="answer must be the index"):
        load_tasks(path)


def test_eval_cli_short_form_and_choice_builtin(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for t, d in zip(TEXTS * 3, "ab" * 6)))
    assert main(["eval", str(model_dir), "--data", str(data), "--split", "all", "--bootstrap", "50",
                 "--out", str(tmp_path / "e"), "--no-progress"]) == 0
    r = json.loads((tmp_path / "e" / "result.json").read_text())
    assert set(r["domains"]) == {"a", "b"} and r["overall"]["documents"] == 12
    assert (tmp_path / "e" / "plots" / "ppl_by_domain.png").is_file() and (tmp_path / "e" / "report.html").is_file()
    capsys.readouterr()
    assert main(["eval", "choice", str(model_dir), "--per-task", "5", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tasks"]) == {"math-answer", "code-next-line"} and out["tasks"]["math-answer"]["n"] == 5
    assert main(["eval", str(model_dir), "--split", "nope"]) == 2


def test_lm_eval_harness_adapter_matches_moelab_scoring(model_dir, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")  # installed by `make test` (the dev extra)
    from lm_eval.tasks import TaskManager

    from moelab.eval.harness import MoelabLM

    qs = [Question("local", "the cat sat", [" on the mat", " five", " gamma"], 0),
          Question("local", "one two", [" three", " mat"], 0), Question("local", "alpha", [" beta", " x"], 1),
          Question("local", "def f(x):", ["\n    return x", " seven"], 0)]
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"context": q.context, "choices": q.choices, "answer": q.answer}) + "\n"
                            for q in qs))
    (tmp_path / "local.yaml").write_text(
        "task: moelab_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{context}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    model, tok = _load(model_dir)
    res = lm_eval.simple_evaluate(model=MoelabLM(model, tok), tasks=["moelab_local"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    got = res["results"]["moelab_local"]
    want = evaluate_choices(model, tok, qs, model.config.max_seq_len)["local"]
    assert got["acc,none"] == pytest.approx(want["acc"]) and got["acc_norm,none"] == pytest.approx(want["acc_norm"])
    assert got["acc_stderr,none"] == pytest.approx(want["acc_stderr"])
    # rolling log-likelihood: every token once, the first given the eos prefix token (by hand)
    from lm_eval.api.instance import Instance

    lm = MoelabLM(model, tok)
    text = "one two three four five six seven eight"  # longer than one window (max_seq_len 16)? check both
    ids = tok.encode(text)
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    if len(ids) + 1 <= model.config.max_seq_len:
        full = torch.tensor([[tok.eos_id] + ids])
        with torch.no_grad():
            logp = F.log_softmax(model(full[:, :-1]).logits[0].float(), -1)
        assert ll == pytest.approx(float(logp.gather(1, full[0, 1:, None]).sum()), rel=1e-5)
    long_text = " ".join([text] * 6)
    (ll_long,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)])
    assert ll_long < ll < 0  # more tokens, each scored once
    (empty,) = lm.loglikelihood([Instance("loglikelihood", {}, ("", " beta"), 0)])  # the eos prefix token
    assert empty[0] < 0
    (gen,) = lm.generate_until([Instance("generate_until", {}, (long_text * 3, {"until": ["\n"], "max_gen_toks": 4}), 0)])
    assert isinstance(gen, str)  # a prompt longer than the context is cut from the left


def test_eval_lm_on_an_hf_checkpoint_equals_the_moelab_model(model_dir, tmp_path):
    """The same weights exported to a Hugging Face directory score the same (moelab.load reads it)."""
    pytest.importorskip("transformers")
    from moelab.eval import eval_lm

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "domain": "x"}) + "\n" for t in TEXTS))
    assert main(["convert", str(model_dir), str(tmp_path / "hf"), "--to", "hf"]) == 0
    a = eval_lm(str(model_dir), None, str(data), "all", resamples=10, progress=False)
    b = eval_lm(str(tmp_path / "hf"), None, str(data), "all", resamples=10, progress=False)
    assert b["overall"]["tokens"] == a["overall"]["tokens"]
    assert b["overall"]["loss"] == pytest.approx(a["overall"]["loss"], rel=1e-5)
