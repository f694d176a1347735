"""Checkpoints: a directory per step, written to a temp dir and renamed, so none is ever half-written.

``checkpoints/step_000100/`` holds
- ``model.safetensors`` + ``config.yaml`` (the model: ``moelab.load`` reads these),
- ``run_config.yaml`` (the whole run config) and ``tokenizer.json``,
- ``trainer_state.pt`` (optimizer, scheduler and RNG states; tensors and plain Python values only,
  read back with ``torch.load(weights_only=True)``) and ``trainer_state.json`` (step, data position).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.errors import CheckpointError
from moelab.faults import kill_point
from moelab.integrity import verify_directory
from moelab.serialization import CONFIG, WEIGHTS, atomic_directory, write_model_files

CHECKPOINTS = "checkpoints"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
REQUIRED = (CONFIG, WEIGHTS, "run_config.yaml", "tokenizer.json", STATE_PT, STATE_JSON)
# a multi-process run's checkpoint (moelab.distributed.checkpoint): DCP shards instead of the two files
REQUIRED_DCP = (CONFIG, "dcp/.metadata", "run_config.yaml", "tokenizer.json", STATE_JSON)
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # next row of this epoch's permutation


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
    return (Path(ckpt) / "dcp").is_dir()


def check_complete(ckpt: Path) -> None:
    ckpt = Path(ckpt)
    missing = [name for name in (REQUIRED_DCP if is_distributed(ckpt) else REQUIRED) if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint is missing {', '.join(missing)}; "
                              "resume from an earlier checkpoint (delete this one) or retrain")


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, position: DataPosition,
                    run_config, tokenizer, keep_last: int, extra: dict | None = None) -> Path:
    target = Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"
    with atomic_directory(target, manifest=True) as tmp:
        write_model_files(model, tmp)
        kill_point("ckpt-weights")
        run_config.save(tmp / "run_config.yaml")
        tokenizer.save(tmp / "tokenizer.json")
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": _python_rng_state(),
        }
        torch.save(state, tmp / STATE_PT)
        meta = {"step": step, "epoch": position.epoch, "index": position.index, **(extra or {})}
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        kill_point("ckpt-state")
    kill_point("ckpt-prune")
    prune(run_dir, keep_last)
    return target


def load_trainer_state(ckpt: Path) -> tuple[dict, dict]:
    """(tensor state, json meta) of a checkpoint; never unpickles arbitrary objects."""
    check_complete(ckpt)
    try:
        state = torch.load(ckpt / STATE_PT, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"{ckpt / STATE_PT}: unreadable trainer state ({e}); it may be truncated") from e
    try:
        meta = json.loads((ckpt / STATE_JSON).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / STATE_JSON}: not valid JSON ({e})") from e
    return state, meta


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
