"""``moelab.load(path)``: one entry point for every kind of saved model.

Accepts a moelab model/checkpoint directory (config.yaml + model.safetensors), a training run
directory (its latest checkpoint) and a Hugging Face model directory (config.json with a
``model_type`` + safetensors weights; see ``moelab.interop.hf``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moelab.checkpoint.integrity import is_moelab_manifest, verify_file
from moelab.checkpoint.layout import CONFIG, DCP_DIR, STATE_JSON, WEIGHTS
from moelab.checkpoint.model_files import load_model
from moelab.checkpoint.run import resolve_checkpoint
from moelab.errors import CheckpointError
from moelab.model import MoETransformer

TOKENIZER = "tokenizer.json"


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         allow_unverified: bool | None = None) -> MoETransformer:
    """Load a model in eval mode from a moelab model, checkpoint or run directory, or an HF model
    directory (``dtype=None`` keeps an HF checkpoint's own dtype). A moelab directory is verified against
    its manifest; one without a manifest loads with a warning (``allow_unverified=True`` or
    ``MOELAB_ALLOW_UNVERIFIED=1``: silently, for directories from before manifests)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / "checkpoints").is_dir():  # a training run: its latest checkpoint
        ckpt = resolve_checkpoint(path, allow_unverified=allow_unverified)  # verified (or warned about)
        model = load_model(ckpt, dtype=dtype, device=device, verify=False)
    elif (path / CONFIG).is_file():
        model = load_model(path, dtype=dtype, device=device, allow_unverified=allow_unverified)
    elif (path / "config.json").is_file():  # a Hugging Face model directory
        from moelab.interop.hf import load_hf

        return load_hf(path, dtype=dtype, device=device)
    else:
        raise CheckpointError(f"{path}: not a moelab model directory (no {CONFIG}) nor an HF model directory "
                              "(no config.json)")
    model.source_dir = path  # export_hf copies the tokenizer saved beside the model
    return model


def _holds_a_model(directory: Path) -> bool:
    """A moelab model or checkpoint directory (its weights or its trainer state are there, beside
    config.yaml), which always has a manifest; a run directory that never saved a checkpoint has
    config.yaml and tokenizer.json but no weights, and none."""
    return (directory / CONFIG).is_file() and any((directory / name).exists() for name in (WEIGHTS, STATE_JSON, DCP_DIR))


def load_tokenizer(path: str | os.PathLike, allow_unverified: bool | None = None):
    """The tokenizer saved beside a model: ``tokenizer.json`` in the checkpoint, run or model directory,
    checked against the directory's manifest when it has one (a moelab model or checkpoint directory
    without one loads with a warning, as :func:`load` does; a run directory without checkpoints and an
    HF directory have none: a ``manifest.json`` of another tool in an HF directory is ignored)."""
    from moelab.data import Tokenizer

    path = Path(path)
    directory = resolve_checkpoint(path, allow_unverified=allow_unverified) if (path / "checkpoints").is_dir() \
        else path
    tok = directory / TOKENIZER
    if not tok.is_file():
        raise CheckpointError(f"{path}: no tokenizer.json; generation needs the tokenizer saved with the model")
    if _holds_a_model(directory) or is_moelab_manifest(directory):  # written by moelab, with a manifest
        verify_file(directory, TOKENIZER, allow_unverified=allow_unverified)
    return Tokenizer.load(tok)
