"""``moelab.load(path)``: one entry point for every kind of saved model.

Accepts a moelab model/checkpoint directory (config.yaml + model.safetensors), a training run
directory (its latest checkpoint) and a Hugging Face model directory (config.json with a
``model_type`` + safetensors weights; see ``moelab.interop.hf``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moelab.checkpoint.layout import CONFIG
from moelab.checkpoint.model_files import load_model
from moelab.checkpoint.run import resolve_checkpoint
from moelab.errors import CheckpointError
from moelab.model import MoETransformer


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> MoETransformer:
    """Load a model in eval mode from a moelab model, checkpoint or run directory, or an HF model
    directory (``dtype=None`` keeps an HF checkpoint's own dtype)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / "checkpoints").is_dir():  # a training run: its latest checkpoint
        model = load_model(resolve_checkpoint(path), dtype=dtype, device=device, verify=False)  # verified
    elif (path / CONFIG).is_file():
        model = load_model(path, dtype=dtype, device=device)
    elif (path / "config.json").is_file():  # a Hugging Face model directory
        from moelab.interop.hf import load_hf

        return load_hf(path, dtype=dtype, device=device)
    else:
        raise CheckpointError(f"{path}: not a moelab model directory (no {CONFIG}) nor an HF model directory "
                              "(no config.json)")
    model.source_dir = path  # export_hf copies the tokenizer saved beside the model
    return model


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a model: ``tokenizer.json`` in the checkpoint, run or model directory."""
    from moelab.data import Tokenizer

    path = Path(path)
    for candidate in ((path / "checkpoints").is_dir() and resolve_checkpoint(path), path):
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return Tokenizer.load(Path(candidate) / "tokenizer.json")
    raise CheckpointError(f"{path}: no tokenizer.json; generation needs the tokenizer saved with the model")
