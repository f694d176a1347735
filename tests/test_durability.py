"""Durability a power loss cannot break: what moelab publishes by a rename is fsynced first (files and
the temp directory), the rename itself is fsynced before anything older is deleted, only "not
supported" fsync errors are ignored, and metrics are on disk before the checkpoint that covers them."""

import errno
import json
import os

import pytest

from moelab.checkpoint.atomic import atomic_directory
from moelab.fileio import fsync_dir, write_atomic


class Recorder:
    """os.fsync / os.replace calls in order, as ("fsync", path) and ("replace", src, dst)."""

    def __init__(self, monkeypatch):
        self.events = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def replace(src, dst, *a, **kw):
            real_replace(src, dst, *a, **kw)
            self.events.append(("replace", str(src), str(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, kind, pred) -> int:
        return next(i for i, e in enumerate(self.events) if e[0] == kind and pred(e))

    def fsyncs(self, path) -> list[int]:
        return [i for i, e in enumerate(self.events) if e == ("fsync", str(path))]


@pytest.mark.parametrize("code,raised", [(errno.EIO, True), (errno.ENOSPC, True), (errno.EINVAL, False),
                                         (errno.ENOTSUP, False), (errno.EBADF, False)])
def test_fsync_dir_raises_io_errors_and_ignores_only_unsupported(tmp_path, monkeypatch, code, raised):
    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    if raised:
        with pytest.raises(OSError) as e:
            fsync_dir(tmp_path)
        assert e.value.errno == code
    else:
        fsync_dir(tmp_path)


def test_write_atomic_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    target = tmp_path / "config.yaml"
    write_atomic(target, "a: 1\n")
    rename = rec.index("replace", lambda e: e[2] == str(target))
    tmp = rec.events[rename][1]
    assert rec.fsyncs(tmp) and rec.fsyncs(tmp)[-1] < rename  # the data is on disk before it is published
    assert rec.fsyncs(tmp_path) and rec.fsyncs(tmp_path)[-1] > rename  # and the rename after
    assert target.read_text() == "a: 1\n"


def test_write_atomic_creates_missing_directories_durably(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    write_atomic(tmp_path / "a" / "b" / "x.txt", "x")
    assert rec.fsyncs(tmp_path) and rec.fsyncs(tmp_path / "a")  # each new directory's entry in its parent


@pytest.mark.parametrize("manifest", [False, True])
def test_atomic_directory_fsyncs_every_file_and_the_temp_dir_before_the_rename(tmp_path, monkeypatch, manifest):
    rec = Recorder(monkeypatch)
    target = tmp_path / "out"
    with atomic_directory(target, manifest=manifest) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a" * 100)
        (tmp / "sub" / "b.bin").write_bytes(b"b" * 100)
    rename = rec.index("replace", lambda e: e[2] == str(target))
    for rel in ("a.bin", "sub/b.bin", ".moelab", *(["manifest.json"] if manifest else [])):
        assert rec.fsyncs(tmp / rel) and rec.fsyncs(tmp / rel)[-1] < rename, rel
    assert rec.fsyncs(tmp / "sub")[-1] < rename and rec.fsyncs(tmp)[-1] < rename
    assert rec.fsyncs(tmp_path)[-1] > rename


def test_a_replaced_directory_is_durable_before_the_old_one_is_deleted(tmp_path, monkeypatch):
    import shutil

    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    rec = Recorder(monkeypatch)
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **kw):
        rec.events.append(("rmtree", str(path)))
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("2")
    rename = rec.index("replace", lambda e: e[2] == str(target))
    delete = rec.index("rmtree", lambda e: ".out.old-" in e[1])
    assert rename < rec.fsyncs(tmp_path)[-1] < delete
    assert (target / "a").read_text() == "2"


def _train_cfg(tmp_path, **kw):
    from moelab.train import TrainConfig
    from tests.helpers import small_config

    model = small_config()
    model.vocab_size = 300
    base = dict(model=model, steps=4, batch_size=2, seq_len=16, warmup_steps=1, eval_every=0, eval_batches=1,
                save_every=1, keep_last=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_checkpoints_are_durable_before_pruning_and_metrics_before_checkpoints(tmp_path, monkeypatch):
    from moelab.train import train

    rec = Recorder(monkeypatch)
    run = tmp_path / "run"
    train(_train_cfg(tmp_path), run)
    root, metrics = run / "checkpoints", run / "metrics.jsonl"
    for step in range(1, 5):
        name = root / f"step_{step:06d}"
        rename = rec.index("replace", lambda e: e[2] == str(name))
        # metrics.jsonl (with this step's record) is fsynced before the checkpoint is published ...
        assert any(i < rename for i in rec.fsyncs(metrics)), step
        before = [i for i in rec.fsyncs(metrics) if i < rename]
        prev = rec.index("replace", lambda e: e[2] == str(root / f"step_{step - 1:06d}")) if step > 1 else -1
        assert before[-1] > prev, f"metrics not synced again between step {step - 1} and {step}"
        # ... and the rename is durable (checkpoints/ fsynced) before an older checkpoint is pruned
        if step > 1:
            prune = rec.index("replace", lambda e: e[1] == str(root / f"step_{step - 1:06d}"))
            assert any(rename < i < prune for i in rec.fsyncs(root)), step
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()][-1] == 4
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"]


def test_a_distributed_checkpoint_makes_its_directories_durable_and_is_marked(tmp_path, monkeypatch):
    # one process, gloo: rank 0 creates checkpoints/ durably in the run directory (fileio.make_dirs) and
    # the checkpoint carries .moelab like every directory moelab writes whole
    import torch
    import torch.distributed as dist

    from moelab.checkpoint.atomic import foreign_files, output_kind
    from moelab.checkpoint.distributed import save_distributed_checkpoint
    from moelab.checkpoint.trainer_state import DataPosition
    from moelab.data import train_tokenizer
    from moelab.model import build_model
    from moelab.train.trainer import lr_lambda, make_optimizer

    class Env:
        rank, world, dp, ep, is_main = 0, 1, 1, 1, True

        def barrier(self):
            dist.barrier()

    cfg = _train_cfg(tmp_path)
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    tok = train_tokenizer(["hello world"] * 4, 300)
    run = tmp_path / "run"
    run.mkdir()
    rec = Recorder(monkeypatch)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ckpt = save_distributed_checkpoint(run, 1, model, opt, sched, DataPosition(), cfg, tok, 3, Env())
    finally:
        dist.destroy_process_group()
    rename = rec.index("replace", lambda e: e[2] == str(ckpt))
    assert any(i < rename for i in rec.fsyncs(run))  # checkpoints/'s entry in the run directory
    assert output_kind(ckpt) == "checkpoint" and foreign_files(ckpt) == []


def test_write_atomic_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    import stat

    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    os.chmod(path, 0o600)  # the user's choice
    write_atomic(path, "a: 2\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and path.read_text() == "a: 2\n"


@pytest.mark.parametrize("manifest", [False, True])
def test_modes_are_set_before_the_fsyncs(tmp_path, monkeypatch, manifest):
    # a mode changed after a file's fsync is not durable with it: chmod first, then fsync
    rec = Recorder(monkeypatch)
    real_chmod, real_fchmod = os.chmod, os.fchmod

    def chmod(path, mode, *a, **kw):
        rec.events.append(("chmod", str(path)))
        return real_chmod(path, mode, *a, **kw)

    def fchmod(fd, mode):
        rec.events.append(("chmod", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fchmod(fd, mode)

    monkeypatch.setattr(os, "chmod", chmod)
    monkeypatch.setattr(os, "fchmod", fchmod)
    with atomic_directory(tmp_path / "out", manifest=manifest) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")
    write_atomic(tmp_path / "c.yaml", "x")
    chmods = [e[1] for e in rec.events if e[0] == "chmod"]
    assert {str(tmp / "sub" / "a.bin"), str(tmp / "sub"), str(tmp)} <= set(chmods)
    for i, e in enumerate(rec.events):
        if e[0] == "chmod":
            assert not any(f == ("fsync", e[1]) for f in rec.events[:i]), e  # no fsync of it came before
