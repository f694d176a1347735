"""Issue 24 (the first hour), generation side: one --json shape, per-row sampling, the public API,
--version and the README's Python quickstart run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moelab
from moelab.cli import main

ROOT = Path(__file__).resolve().parents[1]
MOELAB = [sys.executable, "-m", "moelab.cli"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 30-step run at runs/tiny under a fresh working directory (the path the README uses)."""
    cwd = tmp_path_factory.mktemp("first_hour")
    corpus = cwd / "corpus.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    paragraphs = [" ".join(words[(i + k) % 10] for k in range(3)) for i in range(80)]
    corpus.write_text("".join(json.dumps({"text": "\n\n".join([p] * 12)}) + "\n" for p in paragraphs))
    argv = ["train", "--out", str(cwd / "runs" / "tiny"), "--data", str(corpus), "--steps", "30", "--batch-size", "4",
            "--seq-len", "32", "--no-progress", "--model.vocab-size", "384", "--model.d-model", "32",
            "--model.num-layers", "2", "--model.moe.num-experts", "4", "--model.moe.expert-ffn-dim", "32",
            "--model.dense-ffn-dim", "64", "--model.moe.router.top-k", "1"]
    assert main(argv) == 0
    return cwd


def _moelab(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*MOELAB, *args], check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_version_flag_and_attribute():
    r = _moelab("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"moelab {moelab.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", moelab.__version__)


def test_the_public_api_is_exported_and_dir_is_clean():
    for name in ("load", "load_tokenizer", "generate", "generate_batch", "Completion", "build_model", "ModelConfig"):
        assert name in moelab.__all__ and callable(getattr(moelab, name))
    names = dir(moelab)
    assert "annotations" not in names and "importlib" not in names and "_importlib" not in names
    assert set(moelab.__all__) <= set(names) and "__version__" in names


def test_json_has_one_shape_for_one_or_several_prompts(tiny_run):
    one = _moelab("generate", "runs/tiny", "--prompt", "alpha", "--max-new-tokens", "3", "--json", cwd=tiny_run)
    two = _moelab("generate", "runs/tiny", "--prompt", "alpha", "--prompt", "beta gamma", "--max-new-tokens", "3",
                  "--json", cwd=tiny_run)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    keys = {"prompt", "text", "finish_reason", "token_ids", "logprobs"}
    assert set(a) == set(b) == {"seed", "results"} and a["seed"] == b["seed"] == 0
    assert len(a["results"]) == 1 and len(b["results"]) == 2
    assert all(set(r) == keys for r in a["results"] + b["results"])
    assert [r["prompt"] for r in b["results"]] == ["alpha", "beta gamma"]
    # sampled (the default) with one seed: the first prompt writes the same text alone or in a batch
    assert a["results"][0]["text"] == b["results"][0]["text"]
    assert "Traceback" not in one.stderr + two.stderr


def test_stop_escape_stops_at_a_blank_line(tiny_run):
    """--stop "\\n\\n" as a shell passes it (a backslash and an n) stops where the text has a blank line."""
    model, tok = moelab.load(tiny_run / "runs" / "tiny"), moelab.load_tokenizer(tiny_run / "runs" / "tiny")
    free = moelab.generate_batch(model, ["alpha"], 30, tokenizer=tok, stop_ids=[])[0].text
    r = _moelab("generate", "runs/tiny", "--prompt", "alpha", "--max-new-tokens", "30", "--temperature", "0",
                "--stop", r"\n\n", "--json", cwd=tiny_run)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    row = json.loads(r.stdout)["results"][0]
    assert "\n\n" in free, free  # the corpus puts a blank line after every 3 words
    assert row["finish_reason"] == "stop_string" and row["text"] == free[:free.index("\n\n")]


def test_sampled_rows_do_not_depend_on_their_batch_mates():
    torch.manual_seed(0)
    model = moelab.build_model(moelab.ModelConfig(
        vocab_size=64, d_model=32, num_layers=2, max_seq_len=64, dense_ffn_dim=64,
        attention=moelab.AttentionConfig(num_heads=4, num_kv_heads=2),
        moe=moelab.MoEConfig(num_experts=4, expert_ffn_dim=32, router=moelab.RouterConfig(top_k=2))))
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14, 15]]
    kw = {"temperature": 1.0, "top_k": None, "top_p": None, "seed": 3}
    batch = moelab.generate_batch(model, prompts, 12, **kw)
    for p, c in zip(prompts, batch):
        alone = moelab.generate_batch(model, [p], 12, **kw)[0]
        assert c.token_ids == alone.token_ids
    # different seeds give different samples (the generator is really used)
    other = moelab.generate_batch(model, prompts[:1], 12, **{**kw, "seed": 4})[0]
    assert other.token_ids != batch[0].token_ids


def test_readme_python_quickstart_runs_as_written(tiny_run, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- quickstart: tests/test_first_hour_generate.py runs this block -->", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.DOTALL).group(1)
    assert 'moelab.load("runs/tiny")' in code and "generate_batch" in code and "log_softmax" in code
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tiny_run)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code, run as a user would
    assert len(scope["done"]) == 2 and all(isinstance(c, moelab.Completion) for c in scope["done"])
    assert all(len(c.logprobs) == len(c.token_ids) > 0 and max(c.logprobs) <= 0 for c in scope["done"])
    assert scope["logp"].shape[:2] == (1, len(scope["ids"][0]))
