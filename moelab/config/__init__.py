"""The config tree: ModelConfig > AttentionConfig, MoEConfig > RouterConfig.

Every dataclass validates itself in ``__post_init__`` and raises :class:`ConfigError` (a ValueError)
naming the field, the bad value and the fix. Configs round-trip exactly through YAML and JSON
(``save_config`` / ``load_config``); unknown keys are an error, never silently dropped.

One file per part of the tree: ``router.py`` (RouterConfig and the router families' balancing
defaults), ``moe.py`` (MoEConfig, AoEConfig), ``attention.py`` (AttentionConfig, MLAConfig,
YaRNConfig), ``model.py`` (ModelConfig, MTPConfig); ``checks.py`` and ``coerce.py`` hold the field
checks and the dict -> dataclass conversion they share; ``files.py`` reads and writes config files.
"""

from moelab.config.attention import QK_NORM_TYPES, ROPE_TYPES, AttentionConfig, MLAConfig, YaRNConfig
from moelab.config.checks import MAX_SIZE
from moelab.config.coerce import from_dict
from moelab.config.files import load_config, save_config
from moelab.config.model import ACTIVATIONS, NORM_TYPES, ModelConfig, MTPConfig
from moelab.config.moe import AOE_NORMS, AOE_SELECTIONS, AoEConfig, MoEConfig, aoe_d_wide
from moelab.config.router import (
    BALANCE_SCOPES,
    DEFAULT_BIAS_UPDATE_RATE,
    DROP_PRIORITIES,
    EXPERT_CHOICE_EVAL,
    GROUP_SCORES,
    LOSS_FIELDS,
    ROUTER_LOSS_DEFAULTS,
    ROUTER_TYPES,
    SOFTMAX_ORDERS,
    RouterConfig,
    load_balance_coef_from_hf,
)

__all__ = [
    "ACTIVATIONS", "AOE_NORMS", "AOE_SELECTIONS", "BALANCE_SCOPES", "DEFAULT_BIAS_UPDATE_RATE", "DROP_PRIORITIES",
    "EXPERT_CHOICE_EVAL", "GROUP_SCORES", "LOSS_FIELDS", "MAX_SIZE", "NORM_TYPES", "QK_NORM_TYPES", "ROPE_TYPES",
    "ROUTER_LOSS_DEFAULTS", "ROUTER_TYPES", "SOFTMAX_ORDERS",
    "AoEConfig", "AttentionConfig", "MLAConfig", "ModelConfig", "MoEConfig", "MTPConfig", "RouterConfig", "YaRNConfig",
    "aoe_d_wide", "from_dict", "load_balance_coef_from_hf", "load_config", "save_config",
]
