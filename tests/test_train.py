"""Training, exact resume, checkpoints, generation, report, and their CLI commands.

The corpus is a small user JSONL written by the test, so these tests do not depend on the size of
the built-in corpus; `test_data.py` covers the built-in corpus.
"""

import json
import math

import pytest
import torch

from moelab.checkpoint.run import checkpoint_dirs, latest_checkpoint
from moelab.cli import main
from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.errors import CheckpointError, ConfigError, MoelabError
from moelab.inference.generate import generate_ids
from moelab.loading import load, load_tokenizer
from moelab.reports.run import write_run_report
from moelab.train import TrainConfig, Trainer, train
from moelab.train.trainer import read_metrics

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A small corpus with learnable structure in two domains."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(240):
        if i % 2:
            a, b = (int(v) for v in torch.randint(0, 50, (2,), generator=g))
            text = " ".join(f"What is {a + k} plus {b}? Answer: {a + k + b}." for k in range(6))
            dom = "math"
        else:
            start = int(torch.randint(0, len(WORDS), (1,), generator=g))
            text = " ".join(WORDS[(start + k) % len(WORDS)] for k in range(60))
            dom = "words"
        lines.append(json.dumps({"text": text, "domain": dom}))
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_cfg(corpus_file, **kw) -> TrainConfig:
    model = ModelConfig(vocab_size=384, d_model=48, num_layers=2, max_seq_len=64, dense_ffn_dim=96,
                        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                        moe=MoEConfig(num_experts=4, expert_ffn_dim=48,
                                      router=RouterConfig(top_k=2, load_balance_coef=0.01, z_loss_coef=1e-3)))
    base = dict(model=model, data=str(corpus_file), steps=30, batch_size=8, seq_len=48, lr=3e-3, warmup_steps=5,
                eval_every=10, eval_batches=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_loss_and_logs(corpus_file, tmp_path):
    result = train(tiny_cfg(corpus_file, steps=40), tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 41))
    first, last = steps[0]["lm_loss"], steps[-1]["lm_loss"]
    assert first > math.log(384) - 0.5  # starts near uniform over the vocab
    assert last < first - 1.5  # and learns
    assert result.val["val_loss"] < result.unigram_entropy  # beats the unigram baseline
    assert set(result.val["domains"]) == {"math", "words"}
    rec = steps[-1]
    assert set(rec["aux"]) == {"load_balance", "z_loss"}
    assert len(rec["load"]) == 2 and all(abs(sum(layer) - 1) < 1e-4 for layer in rec["load"])
    assert rec["max_load"] >= 1.0 and rec["tokens_per_s"] > 0 and rec["grad_norm"] > 0
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30, 40]
    assert math.isclose(evals[-1]["val_ppl"], math.exp(evals[-1]["val_loss"]), rel_tol=1e-9)


def test_resume_is_bit_identical(corpus_file, tmp_path, monkeypatch):
    cfg = tiny_cfg(corpus_file, steps=16, save_every=4, eval_every=8, grad_accum=2)
    train(cfg, tmp_path / "full")

    original = Trainer.train_step
    calls = {"n": 0}

    def crashing(self, batches):
        calls["n"] += 1
        if calls["n"] == 11:  # dies during step 11; the last checkpoint is step 8
            raise KeyboardInterrupt
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut")
    monkeypatch.setattr(Trainer, "train_step", original)
    assert latest_checkpoint(tmp_path / "cut").name == "step_000008"
    train(cfg, tmp_path / "cut", resume=True)

    def losses(run):
        return [(r["step"], r["loss"], r.get("aux")) for r in read_metrics(run) if r["kind"] == "train"]

    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    a, b = load(tmp_path / "full").state_dict(), load(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = lambda run: [r["val_loss"] for r in read_metrics(run) if r["kind"] == "eval"]  # noqa: E731
    assert evals(tmp_path / "full") == evals(tmp_path / "cut")
    assert [p.name for p in checkpoint_dirs(tmp_path / "cut")] == ["step_000012", "step_000016"]  # keep_last=2


def test_checkpoint_never_half_written(corpus_file, tmp_path, monkeypatch):
    cfg = tiny_cfg(corpus_file, steps=8, save_every=4, eval_every=0)
    import moelab.checkpoint.trainer_state as ck
    real_save = ck.torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint fails halfway (weights written, state not)
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="step_000004 is intact"):
        train(cfg, tmp_path / "run")
    ckpt_root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["step_000004"]  # no temp dir, no half checkpoint
    assert load(tmp_path / "run") is not None


def test_greedy_generation_cache_equals_no_cache(corpus_file, tmp_path):
    train(tiny_cfg(corpus_file, steps=10, eval_every=0), tmp_path / "run")
    model = load(tmp_path / "run")
    tok = load_tokenizer(tmp_path / "run")
    prompt = torch.tensor([tok.encode("What is 12 plus")])
    a = generate_ids(model, prompt, 20, temperature=0.0, use_cache=True)
    b = generate_ids(model, prompt, 20, temperature=0.0, use_cache=False)
    assert a.shape[1] == prompt.shape[1] + 20
    assert torch.equal(a, b)
    batch = torch.randint(0, 384, (3, 5))
    assert torch.equal(generate_ids(model, batch, 12, use_cache=True), generate_ids(model, batch, 12, use_cache=False))
    s1 = generate_ids(model, batch, 8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    s2 = generate_ids(model, batch, 8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert torch.equal(s1, s2)


def test_sliding_window_cache_equals_no_cache():
    from moelab.model import build_model
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, max_seq_len=64,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=1, sliding_window=4),
                      moe=MoEConfig(num_experts=4, expert_ffn_dim=16))
    model = build_model(cfg)
    ids = torch.randint(0, 50, (2, 6))
    assert torch.equal(generate_ids(model, ids, 10, use_cache=True), generate_ids(model, ids, 10, use_cache=False))


def test_report_contains_numbers(corpus_file, tmp_path):
    train(tiny_cfg(corpus_file, steps=12, eval_every=6), tmp_path / "run")
    paths = write_run_report(tmp_path / "run")
    md = paths["md"].read_text()
    result = json.loads(paths["json"].read_text())
    records = read_metrics(tmp_path / "run")
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert result["val_loss"] == last_eval["val_loss"]
    assert f"{last_eval['val_loss']:.4g}" in md and f"{last_eval['val_ppl']:.4g}" in md
    for dom, v in last_eval["domains"].items():
        assert f"| {dom} | {v['loss']:.4g} |" in md
    for key in ("plot_loss", "plot_domain_ppl", "plot_expert_load", "plot_aux", "plot_throughput"):
        assert paths[key].is_file() and paths[key].read_bytes()[:4] == b"\x89PNG"
        assert str(paths[key].relative_to(tmp_path / "run")) in md
    assert "<table>" in paths["html"].read_text()
    assert "expert_ffn_dim: 48" in md  # the resolved config


def test_cli_train_generate_report(corpus_file, tmp_path, capsys):
    run = tmp_path / "cli"
    argv = ["train", "--out", str(run), "--data", str(corpus_file), "--steps", "6", "--eval-every", "3",
            "--batch-size", "4", "--seq-len", "32", "--no-progress", "--model.vocab-size", "384",
            "--model.d-model", "32", "--model.num-layers", "2", "--model.moe.num-experts", "4",
            "--model.moe.expert-ffn-dim", "32", "--model.dense-ffn-dim", "64", "--model.moe.router.top-k", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained to step 6" in out
    saved = TrainConfig.load(run / "config.yaml")
    assert saved.steps == 6 and saved.model.moe.router.top_k == 1 and saved.model.d_model == 32
    assert main(["generate", str(run), "--prompt", "alpha", "--max-new-tokens", "5", "--temperature", "0",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["results"][0]["prompt"] == "alpha" and isinstance(data["results"][0]["text"], str)
    assert main(["report", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["final_step"] == 6
    # resuming with a different config names the field and changes nothing on disk
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(run), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "lr" in err and "resume" in err and "Traceback" not in err
    assert (run / "metrics.jsonl").read_text() == before
    # an existing run directory is never overwritten by a new run
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before


def test_bad_checkpoints(corpus_file, tmp_path):
    train(tiny_cfg(corpus_file, steps=4, eval_every=0), tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run")
    (ckpt / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        Trainer(tiny_cfg(corpus_file, steps=8, eval_every=0), tmp_path / "run", resume=True).fit()
    w = ckpt / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load(ckpt)
    with pytest.raises(MoelabError, match="not a moelab run"):
        Trainer(tiny_cfg(corpus_file), tmp_path / "nothing", resume=True)
    with pytest.raises(ConfigError, match="seq_len"):
        tiny_cfg(corpus_file, seq_len=1000)


def test_evaluate_samples_every_domain():
    """Validation rows are stored domain by domain; a capped evaluation must still see each domain."""
    from moelab.data import PackedData
    from moelab.model import build_model
    from moelab.train.trainer import evaluate
    from tests.helpers import small_config

    ids = torch.randint(0, 64, (20, 8))
    domain_ids = torch.cat([torch.zeros(10, 8), torch.ones(10, 8)]).long()
    data = PackedData(input_ids=ids, labels=ids.clone(), domain_ids=domain_ids, domains=["a", "b"])
    model = build_model(small_config())
    val = evaluate(model, data, batch_size=2, max_batches=2)
    assert set(val["domains"]) == {"a", "b"}
    assert val["val_tokens"] == 4 * 7  # 4 rows, 7 predicted tokens each
    full = evaluate(model, data, batch_size=4, max_batches=100)
    assert full["val_tokens"] == 20 * 7 and full["domains"]["a"]["tokens"] == 70


def test_generate_from_exported_hf_directory(corpus_file, tmp_path, capsys):
    """A run converted to a Hugging Face directory generates the same greedy text as the run."""
    train(tiny_cfg(corpus_file, steps=6, eval_every=0), tmp_path / "run")
    with pytest.warns(UserWarning, match="z-loss"):  # training-only, no HF field: said, not silently dropped
        assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    capsys.readouterr()
    outs = []
    for src in (tmp_path / "run", tmp_path / "hf"):
        assert main(["generate", str(src), "--prompt", "What is", "--max-new-tokens", "12", "--temperature", "0",
                     "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]["text"])
    assert outs[0] == outs[1] and len(outs[0]) > 0


def test_tensorboard_sink_or_clear_error(tmp_path):
    """--tensorboard writes event files when the optional package is there, else names the fix."""
    from moelab.train.metrics import MetricsLog
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(MoelabError, match=r"pip install 'moelab\[tensorboard\]'"):
            MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
        assert not (tmp_path / "metrics.jsonl").exists()  # nothing written by the failed start
        return
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    log.write({"kind": "train", "step": 1, "loss": 2.5, "aux": {"z_loss": 0.1}})
    log.close()
    assert any((tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5


def test_mtp_losses_are_weighted_by_each_ranks_token_share():
    """Issue 22.15 / 23.2: under data parallelism the LM loss and each MTP depth's loss are the rank's
    share of the global mean: its summed loss x world / global targets. Two ranks with uneven targets
    (one row cut short by padding): the mean over the ranks of the shares and of the objectives equals
    one process on the whole batch; the plain per-rank means do not. A rank with no target at all adds
    exactly 0 (not NaN), and in one process the objective is the model's loss bit for bit."""
    from moelab.config import MTPConfig
    from moelab.model import build_model
    from moelab.train.objective import Shares, rank_loss

    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, max_seq_len=32, dense_ffn_dim=48,
                      attention=AttentionConfig(num_heads=4),
                      moe=MoEConfig(num_experts=4, expert_ffn_dim=16, router=RouterConfig(top_k=2)),
                      mtp=MTPConfig(num_modules=2))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 64, (4, 12))
    labels = ids.clone()
    labels[3, 5:] = -100  # rank 1's second row ends early: fewer targets at every depth
    with torch.no_grad():
        whole = model(ids, labels=labels)
        ranks = [(ids[r * 2:r * 2 + 2], labels[r * 2:r * 2 + 2]) for r in range(2)]
        outs = [model(i, labels=lab) for i, lab in ranks]
    shares = Shares.of(labels, 2, world=2)
    assert shares.mtp_targets == [int((labels[:, 2:] != -100).sum()), int((labels[:, 3:] != -100).sum())]
    parts = [rank_loss(o, shares, model.mtp_weight) for o in outs]
    assert float(sum(p.lm for p in parts) / 2) == pytest.approx(float(whole.lm_loss), rel=1e-5)
    for k in range(2):
        assert float(sum(p.mtp[k] for p in parts) / 2) == pytest.approx(float(whole.mtp_losses[k]), rel=1e-5)
        assert abs(float(sum(o.mtp_losses[k] for o in outs) / 2 - whole.mtp_losses[k])) > 1e-3  # unweighted misses it
    aux = [sum(o.aux_losses.values()) for o in (*outs, whole)]  # local statistics here (the trainer's are global)
    assert float(sum(p.loss - a for p, a in zip(parts, aux)) / 2) == pytest.approx(float(whole.loss - aux[2]), rel=1e-5)
    # one process: the objective is the model's loss, bit for bit
    one = rank_loss(whole, Shares.of(labels, 2), model.mtp_weight)
    assert torch.equal(one.loss, whole.loss) and torch.equal(one.lm, whole.lm_loss)
    assert all(torch.equal(a, b) for a, b in zip(one.mtp, whole.mtp_losses))
    # a rank whose share has no target (rows of one real token): exactly 0, finite
    empty = labels[:2].clone()
    empty[:, 1:] = -100
    with torch.no_grad():
        none = rank_loss(model(ids[:2], labels=empty), shares, model.mtp_weight)
    assert float(none.lm) == 0.0 and [float(v) for v in none.mtp] == [0.0, 0.0]
    assert float(none.loss) == pytest.approx(float(sum(model(ids[:2], labels=empty).aux_losses.values())))
