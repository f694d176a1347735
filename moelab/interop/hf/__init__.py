"""Hugging Face interop: load HF MoE checkpoints into moelab models and export them back.

One adapter per family (``mixtral``, ``phimoe``, ``dbrx``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``,
``deepseek_v2``, ``deepseek_v3``), each a config mapping both ways plus declarative key rules
(``families.py`` holds the registry). ``transformers`` is never imported here: config.json is read as
JSON and weights with safetensors.
"""

from moelab.interop.hf.export import export_hf
from moelab.interop.hf.families import (
    ADAPTERS,
    EXPORT_ORDER,
    HF_CONFIG,
    choose_family,
    get_adapter,
    hf_config_to_model_config,
    is_hf_config,
    read_hf_config,
)
from moelab.interop.hf.load import load_hf

__all__ = ["ADAPTERS", "EXPORT_ORDER", "HF_CONFIG", "choose_family", "export_hf", "get_adapter",
           "hf_config_to_model_config", "is_hf_config", "load_hf", "read_hf_config"]
