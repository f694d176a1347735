"""Trustworthy runs: checkpoint manifests catch every truncated or flipped file, resume falls back to
the newest intact checkpoint, a failed save (disk full, permissions) leaves the previous one intact,
no pickle is ever executed, and the kill-and-resume harness ends bit-identical to an uninterrupted run."""

import errno
import json
import pickle
import shutil
import warnings

import pytest
import torch

from moelab.checkpoint.integrity import MANIFEST, check_directory, verify_directory
from moelab.checkpoint.run import checkpoint_dirs, latest_checkpoint
from moelab.cli import main
from moelab.errors import CheckpointError
from moelab.train import Trainer, train
from moelab.train.trainer import read_metrics
from tests.helpers import small_train_config, write_word_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"))


def _cfg(corpus, **kw):
    return small_train_config(corpus, **kw)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("rel") / "run"
    train(_cfg(corpus), d)
    return d


def test_every_checkpoint_file_truncated_or_flipped_is_detected_by_name(run, tmp_path):
    ckpt = checkpoint_dirs(run)[-1]
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert {"model.safetensors", "trainer_state.pt", "trainer_state.json", "config.yaml"} <= set(files)
    assert check_directory(ckpt).ok
    for rel in files:
        for how in ("truncate", "flip"):
            bad = tmp_path / f"{how}_{rel.replace('/', '_')}"
            shutil.copytree(ckpt, bad)
            data = bytearray((bad / rel).read_bytes())
            if how == "truncate":
                data = data[:len(data) // 2]
            else:
                data[len(data) // 2] ^= 0x10  # one bit
            (bad / rel).write_bytes(bytes(data))
            problems = check_directory(bad).problems
            assert len(problems) == 1 and problems[0].startswith(rel), (rel, how, problems)
            assert ("bytes" in problems[0]) if how == "truncate" else ("SHA-256" in problems[0])
            with pytest.raises(CheckpointError, match=rel.replace(".", r"\.")):
                verify_directory(bad)
    gone = tmp_path / "missing"
    shutil.copytree(ckpt, gone)
    (gone / "tokenizer.json").unlink()
    assert check_directory(gone).problems == ["tokenizer.json: missing"]
    (gone / MANIFEST).write_text("{not json")
    assert "manifest.json is unreadable" in check_directory(gone).problems[0]


def test_ckpt_verify_cli(run, tmp_path, capsys):
    assert main(["ckpt", "verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == len(checkpoint_dirs(run))
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint_dirs(run)[-1], bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    assert main(["ckpt", "verify", str(bad), "--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    assert not r["ok"] and "model.safetensors: SHA-256 differs" in r["checkpoints"][0]["problems"][0]


def test_resume_and_load_fall_back_to_the_newest_intact_checkpoint(run, corpus, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(run, d)
    newest = checkpoint_dirs(d)[-1]
    (newest / "trainer_state.pt").write_bytes((newest / "trainer_state.pt").read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000004.*trainer_state\.pt"):
        assert latest_checkpoint(d).name == "step_000002"
    from moelab.loading import load

    with pytest.warns(UserWarning, match="step_000004"):
        load(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(_cfg(corpus, steps=4), d, resume=True).fit()  # redoes steps 3-4 from step 2
    assert [r["loss"] for r in read_metrics(d) if r["kind"] == "train"] == \
           [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]
    # the corrupt step was set aside (never pruned in place of new, intact checkpoints) and redone
    assert (d / "checkpoints" / "corrupt_step_000004").is_dir()
    assert latest_checkpoint(d).name == "step_000004" and check_directory(latest_checkpoint(d)).ok


def test_an_interrupted_replace_is_reported_and_repaired_on_resume(run, corpus, tmp_path):
    """A crash between moving step_N aside and renaming its replacement in (kill point ckpt-rename)."""
    import os

    from moelab.checkpoint.run import recover_checkpoints

    d = tmp_path / "run"
    shutil.copytree(run, d)
    root = d / "checkpoints"
    os.replace(root / "step_000004", root / ".step_000004.old-123")
    (root / ".step_000004.tmp-abc").mkdir()  # the unfinished replacement
    with pytest.warns(UserWarning, match="step_000004 was being replaced"):
        assert latest_checkpoint(d).name == "step_000002"
    assert recover_checkpoints(d) == ["restored step_000004 (its replacement was interrupted)",
                                      "removed unfinished .step_000004.tmp-abc"]
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000004"]
    assert check_directory(root / "step_000004").ok


TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 114624 vs 114516")


@pytest.mark.parametrize("err,why", [(OSError(errno.ENOSPC, "simulated"), "the disk is full"),
                                     (OSError(errno.EACCES, "simulated"), "permission denied"),
                                     (TORCH_FULL, "the disk is full")])  # what torch.save raises on a full disk
def test_a_failed_save_keeps_the_previous_checkpoint_and_says_why(err, why, corpus, tmp_path, monkeypatch):
    import moelab.checkpoint.trainer_state as ck
    import moelab.train.trainer as tr

    real = ck.torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4)
            raise err
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    if isinstance(err, RuntimeError):  # no errno: the free space tells
        monkeypatch.setattr(tr.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    d = tmp_path / "run"
    with pytest.raises(CheckpointError, match=f"{why}.*step_000002 is intact"):
        Trainer(_cfg(corpus), d).fit()
    assert [c.name for c in checkpoint_dirs(d)] == ["step_000002"]
    assert verify_directory(checkpoint_dirs(d)[0], require_manifest=True).ok
    assert [p.name for p in (d / "checkpoints").iterdir()] == ["step_000002"]  # no temp directory left
    monkeypatch.setattr(ck.torch, "save", real)
    monkeypatch.undo()
    Trainer(_cfg(corpus), d, resume=True).fit()  # fixed: resume
    assert latest_checkpoint(d).name == "step_000004"


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_a_malicious_pickle_in_a_checkpoint_is_refused_without_running(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "run"
    train(_cfg(corpus, steps=2), d)
    ckpt = checkpoint_dirs(d)[-1]
    with open(ckpt / "trainer_state.pt", "wb") as f:
        pickle.dump({"optimizer": _Payload()}, f)
    with pytest.raises(CheckpointError, match="trainer_state.pt"):  # the manifest catches the swap first
        Trainer(_cfg(corpus, steps=3), d, resume=True).fit()
    from moelab.checkpoint.integrity import write_manifest

    write_manifest(ckpt)  # an attacker who rewrites the manifest too: torch.load(weights_only=True) refuses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="unreadable trainer state"):
            Trainer(_cfg(corpus, steps=3), d, resume=True).fit()
    torch.save({"x": _Payload()}, ckpt / "trainer_state.pt")  # torch's own format with a pickled object
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match="unreadable trainer state"):
        Trainer(_cfg(corpus, steps=3), d, resume=True).fit()
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


@pytest.mark.slow
def test_kill_and_resume_ends_bit_identical(tmp_path):
    """The reduced CI version of `moelab ckpt torture` (docs/reliability.md has the full run)."""
    from moelab.reliability.torture import default_config, torture

    cfg = default_config()
    cfg.steps = 8
    cfg.save(tmp_path / "cfg.yaml")
    r = torture(tmp_path / "cfg.yaml", tmp_path / "t", kills=5, seed=1, progress=False)
    assert r["identical"] and r["differences"] == [] and r["unreadable_checkpoints"] == []
    assert r["kills"] >= 4 and r["bytes_compared"] > 100_000
    assert set(r["kills_by_kind"]) >= {"ckpt-weights", "ckpt-state", "ckpt-manifest", "ckpt-rename"}
    assert (tmp_path / "t" / "timeline.png").is_file() and (tmp_path / "t" / "report.md").is_file()


def _poison(trainer, at_step: int, what: str, factor: float = float("nan")):
    """From the step after ``at_step`` (once, or for good with "weight"): a NaN router weight, or the
    loss multiplied by ``factor`` (NaN: a non-finite loss and gradients; 10: a spike)."""
    real_step = trainer.train_step
    fired = []

    def step(batches):
        if trainer.step == at_step and not fired:
            fired.append(True)
            if what == "weight":
                with torch.no_grad():
                    trainer.model.blocks[1].ffn.router.weight[0, 0] = float("nan")
            else:
                real_forward = trainer.model.forward

                def forward(*a, **kw):
                    out = real_forward(*a, **kw)
                    out.loss = out.loss * factor
                    return out

                trainer.model.forward = forward
                try:
                    return real_step(batches)
                finally:
                    del trainer.model.forward
        return real_step(batches)

    trainer.train_step = step


def test_a_nan_stops_training_naming_the_first_layer_and_saving_the_routing(corpus, tmp_path):
    from moelab.train.trainer import NumericsError

    t = Trainer(_cfg(corpus, steps=5), tmp_path / "run")
    _poison(t, 2, "weight")
    with pytest.raises(NumericsError, match=r"step 3: non-finite .*first non-finite output: blocks\.1\.ffn\.router"):
        t.fit()
    diag = tmp_path / "run" / "diagnostics" / "step_000003"
    info = json.loads((diag / "diagnosis.json").read_text())
    assert info["first_nonfinite_parameter"] == "blocks.1.ffn.router.weight"
    from safetensors.torch import load_file

    saved = load_file(str(diag / "routing.safetensors"))
    assert saved["blocks.0.ffn.router_logits"].shape == (4 * 32, 4) and torch.isfinite(saved["blocks.0.ffn.router_logits"]).all()
    assert torch.isnan(saved["blocks.1.ffn.router_logits"]).any()
    assert set(saved) >= {"blocks.0.ffn.expert_load", "blocks.1.ffn.expert_load"}


def test_nonfinite_skip_drops_one_update_and_training_goes_on(corpus, tmp_path):
    t = Trainer(_cfg(corpus, steps=5, nonfinite="skip"), tmp_path / "run")
    _poison(t, 2, "loss")
    with pytest.warns(UserWarning, match="step 3: non-finite .* update skipped"):
        t.fit()
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs if r["kind"] == "skipped"] == [3]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 4, 5]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    # the skip budget spans resumes: it is saved with the checkpoint
    assert json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())["skips"] == 1
    resumed = Trainer(_cfg(corpus, steps=6, nonfinite="skip"), tmp_path / "run", resume=True)
    resumed.fit()
    assert resumed.skips == 1


def test_a_loss_spike_rolls_back_to_the_last_checkpoint(corpus, tmp_path):
    cfg = _cfg(corpus, steps=9, save_every=3, spike_factor=3.0, spike_action="rollback", grad_clip=1.0)
    t = Trainer(cfg, tmp_path / "run")
    _poison(t, 6, "loss", factor=10.0)
    with pytest.warns(UserWarning, match=r"step 7: loss spike .* rolled back to step_000006"):
        t.fit()
    recs = read_metrics(tmp_path / "run")
    rb = [r for r in recs if r["kind"] == "rollback"]
    assert len(rb) == 1 and rb[0]["from_step"] == 7 and rb[0]["step"] == 6
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 10))  # the spike's record dropped
    assert t.step == 9
    with pytest.raises(Exception, match="spike_factor"):
        _cfg(corpus, spike_factor=0.5)
    with pytest.raises(Exception, match="spike_window"):
        _cfg(corpus, spike_window=0)


def test_a_warned_spike_is_in_the_metrics(corpus, tmp_path):
    t = Trainer(_cfg(corpus, steps=8, spike_factor=3.0, grad_clip=1.0), tmp_path / "run")
    _poison(t, 6, "loss", factor=10.0)
    with pytest.warns(UserWarning, match="step 7: loss spike"):
        t.fit()
    spikes = [r for r in read_metrics(tmp_path / "run") if r.get("spike")]
    assert [r["step"] for r in spikes] == [7] and spikes[0]["spike"]["factor"] > 3


def test_compare_numbers_are_the_runs_own(corpus, tmp_path, capsys):
    from moelab.reports.compare import compare_runs

    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(corpus, steps=4, eval_every=2), a)
    train(_cfg(corpus, steps=4, eval_every=2, lr=1e-2), b)
    r = compare_runs([a, b], tmp_path / "cmp")
    for run, s in zip((a, b), r["runs"]):
        recs = read_metrics(run)
        tr = [x for x in recs if x["kind"] == "train"]
        ev = [x for x in recs if x["kind"] == "eval"]
        assert s["train_lm_loss"] == tr[-1]["lm_loss"] and s["val_loss"] == ev[-1]["val_loss"]
        assert s["median_tokens_per_s"] == sorted(x["tokens_per_s"] for x in tr[1:])[1]  # median of 3
        assert s["max_load_last"] == tr[-1]["max_load"] and s["val_domains"] == {"w": ev[-1]["domains"]["w"]["ppl"]}
    assert r["runs"][0]["total_params"] == r["runs"][1]["total_params"] > 0
    for f in ("report.md", "report.html", "result.json", "plots/loss.png", "plots/load_balance.png",
              "plots/val_ppl_by_domain.png", "plots/tokens_per_s.png"):
        assert (tmp_path / "cmp" / f).is_file(), f
    assert main(["compare", str(a)]) == 2 and "at least two" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2


def test_no_load_path_unpickles():
    """Every torch.load in moelab passes weights_only=True, and the only unpickling is DCP metadata
    through the allowlisting unpickler (tests/test_distributed.py shows it refusing a payload)."""
    import re
    from pathlib import Path

    import moelab

    root = Path(moelab.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path}: {m.group(0)}"
        assert not re.search(r"pickle\.loads?\(|cloudpickle|dill\.", text), path
        if "Unpickler" in text:
            assert path.relative_to(root).as_posix() == "checkpoint/dcp_metadata.py" and "find_class" in text, path


def test_a_run_that_fails_before_starting_leaves_no_directory(tmp_path):
    from moelab.errors import MoelabError

    with pytest.raises(MoelabError):
        train(_cfg(str(tmp_path / "missing.jsonl")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_verified_checkpoint_is_hashed_once_until_a_file_changes(run, tmp_path, monkeypatch):
    """moelab.load + load_tokenizer resolve the same checkpoint: its weights are hashed once."""
    import moelab.checkpoint.integrity as integrity
    from moelab.loading import load, load_tokenizer

    d = tmp_path / "run"
    shutil.copytree(run, d)
    now = integrity._clock()  # the copy's files seconds old by the racily-clean rule (ctime cannot be set back)
    monkeypatch.setattr(integrity, "_clock", lambda: now + 5 * 10**9)
    hashed = []
    real = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p: hashed.append(p.name) or real(p))
    load(d)
    load_tokenizer(d)
    assert hashed.count("model.safetensors") == 1
    w = latest_checkpoint(d) / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 1
    w.write_bytes(bytes(data))  # a change (new modification time) is hashed again, and caught
    with pytest.warns(UserWarning, match="model.safetensors: SHA-256 differs"):
        assert latest_checkpoint(d).name == "step_000002"
