"""Rolling back on several ranks to a checkpoint one process wrote (a run resumed in another layout)."""

from __future__ import annotations

from pathlib import Path

from moelab.checkpoint.layout import WEIGHTS
from moelab.checkpoint.model_files import load_state_strict, read_weights
from moelab.checkpoint.trainer_state import load_trainer_state
from moelab.model import build_model


def read_single_for_parallel(ckpt: Path, model, cfg, make_optimizer) -> tuple[dict, dict, dict]:
    """A 1-process checkpoint read into ``model``, already parallelized (FSDP2 / expert parallelism):
    the weights go into a plain copy of the model first (names and shapes checked there), then into
    every rank's shards as full tensors; the optimizer state comes back by parameter name for
    ``load_full_optimizer_state`` to shard, as at a 1 -> N resume. Returns (trainer state, meta, that
    optimizer state): what ``Trainer._restore`` takes as ``single``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from moelab.checkpoint.distributed import full_optimizer_state

    state, meta = load_trainer_state(ckpt)
    plain = build_model(cfg.model)
    load_state_strict(plain, read_weights(ckpt / WEIGHTS), str(ckpt))
    optimizer = make_optimizer(plain, cfg)
    optimizer.load_state_dict(state["optimizer"])
    set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    return state, meta, full_optimizer_state(plain, optimizer)
