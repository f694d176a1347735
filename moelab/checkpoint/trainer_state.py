"""One process's training state in a checkpoint: ``save_checkpoint`` writes the model, the run config,
the tokenizer, the optimizer/scheduler/RNG states and the data position into a new
``checkpoints/step_N/`` atomically (a crash never leaves it half-written); ``load_trainer_state``
reads the states back without unpickling anything but tensors and plain values."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.checkpoint.atomic import atomic_directory
from moelab.checkpoint.layout import CHECKPOINTS, STATE_JSON, STATE_PT
from moelab.checkpoint.model_files import write_model_files
from moelab.checkpoint.run import check_complete, prune
from moelab.errors import CheckpointError
from moelab.faults import kill_point


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # next row of this epoch's permutation


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, position: DataPosition,
                    run_config, tokenizer, keep_last: int, extra: dict | None = None) -> Path:
    target = Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"
    # force: the run directory is moelab's own, and re-saving a step replaces whatever is in it
    with atomic_directory(target, manifest=True, kind="checkpoint", force=True) as tmp:
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
