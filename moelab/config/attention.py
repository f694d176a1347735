"""AttentionConfig (MHA/GQA/MQA, sliding windows, RoPE/LongRoPE/YaRN) with MLAConfig and YaRNConfig."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moelab.config.checks import check_choice, check_positive
from moelab.config.coerce import from_dict
from moelab.errors import ConfigError

QK_NORM_TYPES = ("none", "per_head", "full")
ROPE_TYPES = ("default", "longrope", "yarn")


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 §2.1, V3 eqs. 1-11): queries through an optional
    low-rank latent, keys and values through one joint latent c_KV (kv_lora_rank) that is all the KV
    cache keeps, plus one decoupled RoPE key (qk_rope_head_dim) shared by every head."""

    kv_lora_rank: int = 512  # d_c
    q_lora_rank: int | None = 1536  # d'_c; None: a full-rank query projection (DeepSeek-V2-Lite)
    qk_nope_head_dim: int = 128  # d_h, the per-head query/key part without position
    qk_rope_head_dim: int = 64  # d_h^R, the decoupled RoPE part of each query and the shared key
    v_head_dim: int = 128
    # the released checkpoints store each RoPE part as interleaved (even, odd) pairs (HF
    # rope_interleave, always on for DeepSeek-V2); False: the half-split layout of Llama
    rope_interleave: bool = True
    latent_norm_eps: float = 1e-6  # the RMSNorms on c_Q and c_KV (HF builds them with the default eps)

    def __post_init__(self) -> None:
        check_positive("attention.mla.kv_lora_rank", self.kv_lora_rank)
        if self.q_lora_rank is not None:
            check_positive("attention.mla.q_lora_rank", self.q_lora_rank)
        check_positive("attention.mla.qk_nope_head_dim", self.qk_nope_head_dim, allow_zero=True)
        check_positive("attention.mla.qk_rope_head_dim", self.qk_rope_head_dim)
        if self.qk_rope_head_dim % 2:
            raise ConfigError("attention.mla.qk_rope_head_dim", self.qk_rope_head_dim, "must be even for RoPE")
        check_positive("attention.mla.v_head_dim", self.v_head_dim)
        check_positive("attention.mla.latent_norm_eps", self.latent_norm_eps)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class YaRNConfig:
    """YaRN RoPE scaling (Peng et al. 2023) as transformers' ``_compute_yarn_parameters`` computes it:
    frequencies blended between interpolated (/factor) and original by a linear ramp over the
    dimensions whose wavelength lies between beta_fast and beta_slow rotations of the original
    context; cos and sin multiplied by the attention factor. MLA also multiplies its softmax scale by
    mscale(factor, mscale_all_dim)^2 (DeepSeek's rule)."""

    factor: float | None = None  # required: the context extension ratio (DeepSeek-V2/V3: 40)
    original_max_len: int | None = None  # required: the pretraining context, HF original_max_position_embeddings
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # None: mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    truncate: bool = True  # round the ramp's ends to whole dimensions (HF default)

    def __post_init__(self) -> None:
        for name in ("factor", "original_max_len"):
            if getattr(self, name) is None:
                raise ConfigError(f"attention.yarn.{name}", None, "is required for YaRN (DeepSeek-V2/V3: factor 40, "
                                  "original_max_len 4096)")
        check_positive("attention.yarn.factor", self.factor)
        check_positive("attention.yarn.original_max_len", self.original_max_len)
        for name in ("beta_fast", "beta_slow"):
            check_positive(f"attention.yarn.{name}", getattr(self, name))
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"attention.yarn.{name}", getattr(self, name), "must be >= 0")
        if self.attention_factor is not None:
            check_positive("attention.yarn.attention_factor", self.attention_factor)

    @staticmethod
    def mscale_of(scale: float, m: float = 1.0) -> float:
        """YaRN's 0.1 m ln(s) + 1 (1 for s <= 1)."""
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    def cos_sin_factor(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.mscale_of(self.factor, self.mscale) / self.mscale_of(self.factor, self.mscale_all_dim)
        return self.mscale_of(self.factor)

    def softmax_factor(self) -> float:
        """Multiplier of MLA's softmax scale: mscale(factor, mscale_all_dim)^2, 1 when mscale_all_dim is 0."""
        if not self.mscale_all_dim:
            return 1.0
        return self.mscale_of(self.factor, self.mscale_all_dim) ** 2


@dataclass
class AttentionConfig:
    """Causal self-attention: MHA (kv_heads == heads), GQA, MQA (kv_heads == 1), sliding window, or
    multi-head latent attention (``mla``)."""

    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads (MHA)
    head_dim: int | None = None  # None: d_model // num_heads
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # a token sees itself and the previous sliding_window - 1 tokens
    # The layers whose attention slides (Qwen2-MoE's layer_types), the others attend fully; None: every
    # layer slides when sliding_window is set. MTP blocks are layers num_layers, num_layers + 1, ...
    window_layers: tuple[int, ...] | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str = "none"  # "per_head" (Qwen3: RMSNorm over head_dim) or "full" (OLMoE: over all heads)
    clip_qkv: float | None = None  # DBRX/OLMoE: clamp q, k, v to [-c, c]
    logit_softcap: float | None = None  # Grok-1: scores = c * tanh(scores / c)
    # RoPE variant: "default" (plain RoPE) or "longrope" (Ding et al. 2024, LongRoPE; Phi-3 / Phi-3.5-MoE):
    # frequency i is divided by a per-dimension factor, cos and sin are multiplied by an mscale. The
    # rope_* fields below are used by longrope only; each factor list holds head_dim / 2 numbers.
    rope_type: str = "default"
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    # cos/sin multiplier when the sequence is <= / > rope_original_max_len; None: the LongRoPE default
    # sqrt(1 + ln(s) / ln(rope_original_max_len)), s = max_seq_len / rope_original_max_len (1.0 if s <= 1).
    rope_short_mscale: float | None = None
    rope_long_mscale: float | None = None
    rope_original_max_len: int | None = None  # the pretraining context (HF original_max_position_embeddings)
    yarn: YaRNConfig | None = None  # rope_type "yarn" only
    mla: MLAConfig | None = None  # multi-head latent attention instead of MHA/GQA

    def __post_init__(self) -> None:
        if isinstance(self.yarn, dict):
            self.yarn = from_dict(YaRNConfig, self.yarn, "attention.yarn")
        if isinstance(self.mla, dict):
            self.mla = from_dict(MLAConfig, self.mla, "attention.mla")
        check_positive("attention.num_heads", self.num_heads)
        if self.num_kv_heads is not None:
            check_positive("attention.num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ConfigError(
                    "attention.num_kv_heads", self.num_kv_heads,
                    f"must divide attention.num_heads={self.num_heads} (GQA groups heads evenly)",
                )
        if self.head_dim is not None:
            check_positive("attention.head_dim", self.head_dim)
            if self.head_dim % 2:
                raise ConfigError("attention.head_dim", self.head_dim, "must be even for RoPE")
        check_positive("attention.rope_theta", self.rope_theta)
        if self.sliding_window is not None:
            check_positive("attention.sliding_window", self.sliding_window)
        if self.window_layers is not None:
            self._validate_window_layers()
        check_choice("attention.qk_norm", self.qk_norm, QK_NORM_TYPES)
        if self.clip_qkv is not None:
            check_positive("attention.clip_qkv", self.clip_qkv)
        if self.logit_softcap is not None:
            check_positive("attention.logit_softcap", self.logit_softcap)
        self._validate_rope_scaling()
        if self.mla is not None:
            self._validate_mla()

    def _validate_window_layers(self) -> None:
        w = self.window_layers
        if not isinstance(w, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in w):
            raise ConfigError("attention.window_layers", w, "must be a list of layer indices >= 0")
        if self.sliding_window is None:
            raise ConfigError("attention.window_layers", w, "needs attention.sliding_window (the window those "
                              "layers use); set it, or remove window_layers for full attention everywhere")
        if not w:
            raise ConfigError("attention.window_layers", w, "lists no layer; remove attention.sliding_window and "
                              "attention.window_layers for full attention everywhere")
        if len(set(w)) != len(w):
            raise ConfigError("attention.window_layers", w, "lists a layer twice; list each sliding layer once")
        self.window_layers = tuple(sorted(w))

    def _validate_mla(self) -> None:
        if self.num_kv_heads not in (None, self.num_heads):
            raise ConfigError("attention.num_kv_heads", self.num_kv_heads,
                              "MLA has one key and value per head (leave num_kv_heads unset with attention.mla)")
        for name, off in (("head_dim", None), ("sliding_window", None), ("clip_qkv", None), ("logit_softcap", None),
                          ("qk_norm", "none")):
            if getattr(self, name) != off:
                raise ConfigError(f"attention.{name}", getattr(self, name),
                                  "is not used by multi-head latent attention; remove it or remove attention.mla")

    def _validate_rope_scaling(self) -> None:
        check_choice("attention.rope_type", self.rope_type, ROPE_TYPES)
        if (self.rope_type == "yarn") != (self.yarn is not None):
            raise ConfigError("attention.yarn", self.yarn,
                              "set attention.yarn exactly when attention.rope_type is 'yarn'")
        for name in ("rope_short_factor", "rope_long_factor"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or any(
                    isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in value):
                raise ConfigError(f"attention.{name}", value, "must be a list of positive numbers")
            setattr(self, name, tuple(float(f) for f in value))
        for name in ("rope_short_mscale", "rope_long_mscale", "rope_original_max_len"):
            if getattr(self, name) is not None:
                check_positive(f"attention.{name}", getattr(self, name))
        longrope_fields = ("rope_short_factor", "rope_long_factor", "rope_short_mscale", "rope_long_mscale",
                           "rope_original_max_len")
        if self.rope_type in ("default", "yarn"):
            for name in longrope_fields:
                if getattr(self, name) not in (None, ()):
                    raise ConfigError(f"attention.{name}", getattr(self, name),
                                      "is used only with attention.rope_type=longrope; set rope_type or remove it")
            return
        for name in ("rope_short_factor", "rope_long_factor"):
            if not getattr(self, name):
                raise ConfigError(f"attention.{name}", (), "rope_type=longrope needs head_dim / 2 factors")
        if self.rope_original_max_len is None or self.rope_original_max_len < 2:
            raise ConfigError("attention.rope_original_max_len", self.rope_original_max_len,
                              "rope_type=longrope needs the pretraining context length >= 2 (HF "
                              "original_max_position_embeddings)")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads
