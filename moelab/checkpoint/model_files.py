"""Save and load a model as ``config.yaml`` + ``model.safetensors`` (never pickle).

Writes go through :func:`moelab.checkpoint.atomic.atomic_directory` (a temporary directory renamed
into place), so a crash never leaves a half-written model directory. Loads check every key and shape and name what is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moelab.checkpoint.atomic import atomic_directory
from moelab.checkpoint.integrity import verify_directory
from moelab.checkpoint.layout import CONFIG, DCP_DIR, WEIGHTS
from moelab.config import load_config, save_config
from moelab.errors import CheckpointError
from moelab.model import MoETransformer, build_model


def model_state(model: MoETransformer) -> dict[str, torch.Tensor]:
    """State dict with tied weights stored once (the LM head of a tied model is the embedding)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_model_files(model: MoETransformer, directory: Path) -> None:
    """Write config and weights into an existing directory (callers make it atomic)."""
    save_config(model.config, directory / CONFIG)
    save_file(model_state(model), str(directory / WEIGHTS), metadata={"format": "pt", "library": "moelab"})


def save_model(model: MoETransformer, directory: str | os.PathLike, extra_files: dict | None = None,
               force: bool = False) -> Path:
    """Save ``model`` to ``directory`` (config.yaml + model.safetensors), atomically, with a manifest;
    ``extra_files``: {name: source path} copied in first (a tokenizer), so the manifest covers them.
    An existing ``directory`` is replaced only when it is a saved model whose files moelab wrote and
    nobody changed since, or with ``force``."""
    directory = Path(directory)
    with atomic_directory(directory, manifest=True, kind="moelab-model", force=force) as tmp:
        write_model_files(model, tmp)
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
    return directory


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing; the checkpoint is incomplete, re-save it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated") from e


def load_state_strict(model: MoETransformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``; every key must be used and every parameter filled, shapes equal."""
    expected = model_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(v.shape)}, config expects "
                                  f"{tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)  # strict=False only because a tied head is stored once


def load_model(directory: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", verify: bool = True,
               allow_unverified: bool | None = None) -> MoETransformer:
    """Load a directory written by :func:`save_model` (or a moelab checkpoint) in eval mode. Every such
    directory has a manifest, which must match file by file; without one it loads with a warning
    (``allow_unverified``, default ``MOELAB_ALLOW_UNVERIFIED``: silently, for one from before manifests)."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise CheckpointError(f"{directory}: no {CONFIG}; not a moelab model or checkpoint directory")
    if verify:
        verify_directory(directory, allow_unverified=allow_unverified)
    cfg = load_config(directory / CONFIG)
    if not (directory / WEIGHTS).is_file() and (directory / DCP_DIR).is_dir():  # saved by a multi-process run
        from moelab.checkpoint.distributed import load_distributed_checkpoint

        model = build_model(cfg, device=device)
        load_distributed_checkpoint(directory, model)
    else:
        state = read_weights(directory / WEIGHTS)
        model = build_model(cfg, device=device)
        load_state_strict(model, state, str(directory / WEIGHTS))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
