"""Config files: ``save_config`` / ``load_config`` (YAML or JSON, written atomically)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from moelab.config.model import ModelConfig
from moelab.errors import ConfigError
from moelab.fileio import write_atomic


def save_config(config: ModelConfig, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
    path = Path(path)
    data = config.to_dict()
    if path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    write_atomic(path, text)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read a moelab config written by :func:`save_config` (YAML or JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file", str(path), "file not found; pass a moelab config .yaml/.json")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError("config file", str(path), f"could not be parsed: {e}") from e
    if isinstance(data, dict) and "model" in data and "vocab_size" not in data:
        data = data["model"]  # a run config (train settings + model) is accepted too
    return ModelConfig.from_dict(data)
