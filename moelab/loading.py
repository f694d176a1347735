"""``moelab.load(path)``: one entry point for every kind of saved model.

Accepts a moelab model/checkpoint directory (config.yaml + model.safetensors). Hugging Face model
directories and training run directories are added by the interop and training modules.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moelab.errors import CheckpointError
from moelab.model import MoETransformer
from moelab.serialization import CONFIG, load_model


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> MoETransformer:
    """Load a model in eval mode from a moelab model or checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / CONFIG).is_file():
        return load_model(path, dtype=dtype, device=device)
    raise CheckpointError(f"{path}: not a moelab model directory (no {CONFIG})")
