"""moelab: Mixture-of-Experts language models in PyTorch."""

from moelab.config import AoEConfig, AttentionConfig, ModelConfig, MoEConfig, RouterConfig, load_config, save_config
from moelab.errors import CheckpointError, ConfigError, MoelabError
from moelab.interop.hf import export_hf
from moelab.loading import load
from moelab.model import ModelOutput, MoETransformer, build_model
from moelab.params import count_params
from moelab.presets import get_preset

__version__ = "0.1.0"

__all__ = [
    "AoEConfig", "AttentionConfig", "CheckpointError", "ConfigError", "ModelConfig", "ModelOutput", "MoEConfig",
    "MoETransformer", "MoelabError", "RouterConfig", "build_model", "count_params", "export_hf", "get_preset",
    "load", "load_config", "save_config",
]
