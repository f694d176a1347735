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

from moelab.checkpoint.integrity import verify_directory
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


def latest_checkpoint(run_dir: Path, verify: bool = True) -> Path:
    """The newest complete checkpoint whose files match its manifest; a newer one that is incomplete
    or corrupt is skipped with a warning naming it and why (a checkpoint without a manifest, from
    before manifests, is accepted)."""
    dirs = checkpoint_dirs(run_dir)
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():  # an interrupted re-save left the old copy aside: say so (resuming repairs it)
        for p in root.iterdir():
            m = _HIDDEN.match(p.name)
            if m and m.group(2) == "old" and not (root / m.group(1)).exists():
                warnings.warn(f"{root}: {m.group(1)} was being replaced when a process died (its previous copy is "
                              f"{p.name}); resume the run to restore it", stacklevel=2)
    if not dirs:
        raise CheckpointError(f"{run_dir}: no checkpoint in {CHECKPOINTS}/; train with --save-every or let a run finish")
    if not verify:
        return dirs[-1]
    skipped = []
    for ckpt in reversed(dirs):
        try:
            check_complete(ckpt)
            verify_directory(ckpt)
        except CheckpointError as e:
            skipped.append(f"{ckpt.name} ({e})")
            warnings.warn(f"skipping checkpoint {ckpt}: {e}", stacklevel=2)
            continue
        return ckpt
    raise CheckpointError(f"{run_dir}: no intact checkpoint; every one failed verification: {'; '.join(skipped)}")


def is_distributed(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR).is_dir()


def check_complete(ckpt: Path) -> None:
    ckpt = Path(ckpt)
    missing = [name for name in (REQUIRED_DCP if is_distributed(ckpt) else REQUIRED) if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint is missing {', '.join(missing)}; "
                              "resume from an earlier checkpoint (delete this one) or retrain")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory -> its latest complete checkpoint; a checkpoint directory -> itself."""
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        return latest_checkpoint(path)  # complete and verified, newer corrupt ones skipped with a warning
    check_complete(path)
    return path
