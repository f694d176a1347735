"""The HF families moelab reads and writes: the adapter registry, config.json reading, the HF -> moelab
config mapping and the choice of a family for export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moelab.config import ModelConfig
from moelab.errors import CheckpointError, ConfigError, MoelabError
from moelab.interop.hf.common import Adapter, UnsupportedForFamily
from moelab.interop.hf.config_reader import HFConfig
from moelab.interop.hf.dbrx import DbrxAdapter
from moelab.interop.hf.deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from moelab.interop.hf.mixtral import MixtralAdapter
from moelab.interop.hf.olmoe import OlmoeAdapter
from moelab.interop.hf.phimoe import PhimoeAdapter
from moelab.interop.hf.qwen2_moe import Qwen2MoeAdapter
from moelab.interop.hf.qwen3_moe import Qwen3MoeAdapter

ADAPTERS: dict[str, Adapter] = {a.model_type: a for a in (
    MixtralAdapter(), PhimoeAdapter(), DbrxAdapter(), Qwen2MoeAdapter(), Qwen3MoeAdapter(), OlmoeAdapter(),
    DeepseekV2Adapter(), DeepseekV3Adapter())}
# Export of a moelab-native model tries the families in this order and takes the first that fits.
EXPORT_ORDER = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "dbrx", "phimoe", "deepseek_v3", "deepseek_v2")
HF_CONFIG = "config.json"


def get_adapter(model_type: Any) -> Adapter:
    if model_type not in ADAPTERS:
        raise ConfigError("config.json model_type", model_type,
                          f"unsupported model family; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]


def is_hf_config(data: Any) -> bool:
    return isinstance(data, dict) and "model_type" in data


def read_hf_config(path: str | os.PathLike) -> dict:
    """config.json (or the directory holding it) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / HF_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; an HF model directory holds a {HF_CONFIG}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not is_hf_config(data):
        raise CheckpointError(f"{path}: no model_type field; not a Hugging Face config.json")
    return data


def hf_config_to_model_config(data: dict, counting_only: bool = False, where: str = HF_CONFIG) -> ModelConfig:
    """Map an HF config.json dict to a moelab ModelConfig, field by field; an HF field moelab cannot
    honour is a ConfigError naming it. ``counting_only`` tolerates numerics-only fields moelab cannot
    run yet (scaled RoPE), for parameter counting."""
    adapter = get_adapter(data.get("model_type"))
    hf = HFConfig(data, where, counting_only)
    try:
        cfg = adapter.to_moelab(hf)
    except ConfigError as e:
        if e.field.startswith(where):
            raise
        raise ConfigError(f"{where} ({adapter.model_type}) -> moelab {e.field}", e.value, e.fix) from e
    hf.finish()
    return cfg


def choose_family(cfg: ModelConfig, family: str | None = None, preferred: str | None = None) -> tuple[Adapter, dict]:
    """The HF family that expresses ``cfg`` exactly (``family`` forces one), with its config fields."""
    if family is not None:
        order = [get_adapter(family).model_type]
    else:
        order = ([preferred] if preferred in ADAPTERS else []) + [f for f in EXPORT_ORDER if f != preferred]
    problems = {}
    for name in order:
        try:
            return ADAPTERS[name], ADAPTERS[name].from_moelab(cfg)
        except UnsupportedForFamily as e:
            problems[name] = e.features
    detail = "; ".join(f"{name}: {', '.join(p)}" for name, p in problems.items())
    raise MoelabError(f"no Hugging Face family can express this model ({detail}); keep it in moelab's own format "
                      "(`moelab convert SRC DST --to moelab` or moelab.checkpoint.model_files.save_model)")
