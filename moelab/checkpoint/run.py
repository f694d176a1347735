"""A training run's checkpoints: ``RUN/checkpoints/step_N/`` directories listed, verified, chosen,
pruned and recovered after a crash (file names in :mod:`moelab.checkpoint.layout`). Saving them is
:mod:`moelab.checkpoint.trainer_state` (one process) or :mod:`moelab.checkpoint.distributed` (DCP).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

from moelab.checkpoint.dcp_metadata import check_dcp_files
from moelab.checkpoint.integrity import ALLOW_ENV, MANIFEST, allow_unverified_default, verify_directory
from moelab.checkpoint.layout import CHECKPOINTS, DCP_DIR, REQUIRED, REQUIRED_DCP
from moelab.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temp dirs are never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; each is renamed to a hidden temp name
    first, so a crash mid-delete never leaves a visible, partly deleted checkpoint."""
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        hidden = old.with_name(f".{old.name}.tmp-prune")
        try:
            os.replace(old, hidden)
        except OSError:
            continue
        shutil.rmtree(hidden, ignore_errors=True)


def set_aside_newer(run_dir: Path, chosen: Path) -> list[str]:
    """Resuming from ``chosen`` abandons the checkpoints after it (they failed verification, or
    belong to a future that is being redone): rename them ``corrupt_step_N`` so pruning can never
    keep them in place of new, intact ones. Returns what was moved."""
    moved = []
    step = int(_STEP_DIR.match(chosen.name).group(1))
    for d in checkpoint_dirs(run_dir):
        if int(_STEP_DIR.match(d.name).group(1)) > step:
            target = d.with_name(f"corrupt_{d.name}")
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(d, target)
            moved.append(f"{d.name} -> {target.name}")
    return moved


_HIDDEN = re.compile(r"^\.(step_\d+)\.(tmp|old)-")


def recover_checkpoints(run_dir: Path) -> list[str]:
    """After a crash: a checkpoint moved aside while being replaced by a new save of the same step
    (``.step_N.old-*``) is put back when the new one never arrived; unfinished temp directories are
    deleted. Returns what was done. Call on resume, in one process (rank 0)."""
    root = Path(run_dir) / CHECKPOINTS
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        m = _HIDDEN.match(p.name)
        if not m or not p.is_dir():
            continue
        target = root / m.group(1)
        if m.group(2) == "old" and not target.exists():
            os.replace(p, target)
            done.append(f"restored {target.name} (its replacement was interrupted)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed unfinished {p.name}")
    return done


def _assess(ckpt: Path, allow_unverified: bool, part: tuple[int, int] | None) -> tuple[str, str]:
    """("ok" | "unverified" | "bad", why) for one checkpoint: complete and matching its manifest, or
    without a manifest, or incomplete/corrupt/malformed (this process's ``part`` of the hashing)."""
    try:
        check_complete(ckpt)
        v = verify_directory(ckpt, allow_unverified=True, part=part)
    except CheckpointError as e:
        return "bad", str(e)
    except OSError as e:  # unreadable: a disk error, a permission
        return "bad", f"{ckpt}: {e}"
    if not v.has_manifest and not allow_unverified:
        return "unverified", (f"{MANIFEST} is missing (every checkpoint moelab writes has one: lost or removed; "
                              f"{ALLOW_ENV}=1 accepts checkpoints from before manifests)")
    return "ok", ""


def _worst(results: list[tuple[str, str]]) -> tuple[str, str]:
    """One verdict from every process's: any "bad" is bad, then any "unverified"."""
    for status in ("bad", "unverified"):
        for r in results:
            if r[0] == status:
                return tuple(r)
    return "ok", ""


def latest_checkpoint(run_dir: Path, verify: bool = True, allow_unverified: bool | None = None,
                      part: tuple[int, int] | None = None, combine=None, names: list[str] | None = None,
                      warn: bool = True) -> Path:
    """The newest complete checkpoint whose files match its manifest; a newer one that is incomplete,
    corrupt or has a malformed manifest is skipped with a warning naming it and why. One without a
    manifest (lost or removed) is unverified: an older verified one is preferred, and when none is
    verified the newest unverified one is taken with a warning; ``allow_unverified`` (default
    ``MOELAB_ALLOW_UNVERIFIED``) accepts it like a verified one (checkpoints from before manifests).

    Several processes choose together (:func:`choose_checkpoint`): ``names`` is rank 0's listing,
    ``part`` this process's share of the hashing and ``combine`` merges every process's verdict on a
    candidate into one, so every process takes the same path; ``warn``: this process reports."""
    allow = allow_unverified_default() if allow_unverified is None else allow_unverified
    root = Path(run_dir) / CHECKPOINTS
    dirs = [root / n for n in names] if names is not None else checkpoint_dirs(run_dir)
    if root.is_dir() and warn:  # an interrupted re-save left the old copy aside: say so (resuming repairs it)
        for p in root.iterdir():
            m = _HIDDEN.match(p.name)
            if m and m.group(2) == "old" and not (root / m.group(1)).exists():
                warnings.warn(f"{root}: {m.group(1)} was being replaced when a process died (its previous copy is "
                              f"{p.name}); resume the run to restore it", stacklevel=2)
    if not dirs:
        raise CheckpointError(f"{run_dir}: no checkpoint in {CHECKPOINTS}/; train with --save-every or let a run finish")
    if not verify:
        return dirs[-1]
    skipped, unverified = [], []
    for ckpt in reversed(dirs):
        status, why = _assess(ckpt, allow, part)
        if combine is not None:
            status, why = combine((status, why))
        if status == "bad":
            skipped.append(f"{ckpt.name} ({why})")
            if warn:
                warnings.warn(f"skipping checkpoint {ckpt}: {why}", stacklevel=2)
            continue
        if status == "unverified":
            unverified.append((ckpt, why))
            continue
        for newer, reason in unverified if warn else ():
            warnings.warn(f"skipping checkpoint {newer}: {reason}; taking the older, verified {ckpt.name}",
                          stacklevel=2)
        return ckpt
    if unverified:
        ckpt, reason = unverified[0]
        if warn:
            warnings.warn(f"no verified checkpoint in {run_dir}: taking {ckpt} UNVERIFIED ({reason})", stacklevel=2)
        return ckpt
    raise CheckpointError(f"{run_dir}: no intact checkpoint; every one failed verification: {'; '.join(skipped)}")


def choose_checkpoint(run_dir: Path, env=None, set_aside: bool = False) -> Path:
    """The checkpoint to resume or roll back to, the same on every process: rank 0 lists the candidates,
    every rank hashes its share of each (about 1/world of its bytes) until all agree one is intact,
    and rank 0 alone sets newer ones aside (``set_aside``, on resume), after every rank has finished
    reading. ``env``: the DistEnv (None: one process)."""
    if env is None or env.world <= 1:
        ckpt = latest_checkpoint(run_dir)
        if set_aside:
            for line in set_aside_newer(run_dir, ckpt):
                warnings.warn(f"{run_dir}: resuming from {ckpt.name}; set aside {line}", stacklevel=2)
        return ckpt
    import torch.distributed as dist

    box = [[d.name for d in checkpoint_dirs(run_dir)] if env.is_main else None]
    dist.broadcast_object_list(box, src=0)

    def combine(verdict):
        every = [None] * env.world
        dist.all_gather_object(every, verdict)
        return _worst(every)

    error = None
    try:
        ckpt = latest_checkpoint(run_dir, part=(env.rank, env.world), combine=combine, names=box[0],
                                 warn=env.is_main)
    except CheckpointError as e:  # the same on every rank: every verdict was combined
        error = e
    if error is None and set_aside and env.is_main:
        for line in set_aside_newer(run_dir, ckpt):
            warnings.warn(f"{run_dir}: resuming from {ckpt.name}; set aside {line}", stacklevel=2)
    env.barrier()
    if error is not None:
        raise error
    return ckpt


def is_distributed(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR).is_dir()


def check_complete(ckpt: Path) -> None:
    """Raise CheckpointError unless every file a checkpoint needs is there: for a distributed one, every
    shard its ``dcp/.metadata`` names and every rank's RNG file, each listed in the manifest."""
    ckpt = Path(ckpt)
    missing = [name for name in (REQUIRED_DCP if is_distributed(ckpt) else REQUIRED) if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint is missing {', '.join(missing)}; "
                              "resume from an earlier checkpoint (delete this one) or retrain")
    if is_distributed(ckpt):
        check_dcp_files(ckpt)


def resolve_checkpoint(path: str | os.PathLike, allow_unverified: bool | None = None) -> Path:
    """A run directory -> its latest complete checkpoint; a checkpoint directory -> itself."""
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        # complete and verified, newer corrupt ones skipped with a warning
        return latest_checkpoint(path, allow_unverified=allow_unverified)
    check_complete(path)
    return path
