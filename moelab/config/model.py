"""ModelConfig, the root of the config tree, and MTPConfig (DeepSeek-V3 multi-token prediction)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from moelab.config.attention import AttentionConfig
from moelab.config.checks import check_choice, check_positive
from moelab.config.coerce import from_dict, to_plain
from moelab.config.moe import MoEConfig, aoe_d_wide
from moelab.errors import ConfigError

NORM_TYPES = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3 §2.2, eqs. 21-25): D sequential modules; module k combines
    the previous depth's hidden state at position i with the embedding of token i+k through its own
    projection and transformer block and predicts token i+k+1 with the shared output head.
    L_MTP = (lambda / D) sum_k L_k, added to the LM loss."""

    num_modules: int = 1  # D (DeepSeek-V3: 1)
    loss_weight: float = 0.3  # lambda (DeepSeek-V3: 0.3 for the first 10T of 14.8T tokens ...)
    final_loss_weight: float | None = None  # ... then 0.1; None keeps loss_weight throughout
    switch_fraction: float = 0.68  # share of the training steps after which final_loss_weight applies

    def __post_init__(self) -> None:
        check_positive("mtp.num_modules", self.num_modules)
        if self.loss_weight < 0:
            raise ConfigError("mtp.loss_weight", self.loss_weight, "must be >= 0")
        if self.final_loss_weight is not None and self.final_loss_weight < 0:
            raise ConfigError("mtp.final_loss_weight", self.final_loss_weight, "must be >= 0")
        if not 0 <= self.switch_fraction <= 1:
            raise ConfigError("mtp.switch_fraction", self.switch_fraction, "must be in [0, 1]")

    def weight_at(self, step: int, total_steps: int) -> float:
        """lambda for optimizer step ``step`` (0-based) of ``total_steps``."""
        if self.final_loss_weight is None or step < self.switch_fraction * total_steps:
            return self.loss_weight
        return self.final_loss_weight


@dataclass
class ModelConfig:
    """A decoder-only transformer whose FFNs may be MoE layers (``moe=None``: fully dense)."""

    vocab_size: int = 4096
    d_model: int = 256
    num_layers: int = 4
    max_seq_len: int = 2048
    dense_ffn_dim: int = 1024  # SwiGLU width of the dense FFN layers
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only: Phi-3.5-MoE has a bias, DBRX has none
    sandwich_norm: bool = False  # Grok-1: extra norms on the attention and FFN outputs
    activation: str = "silu"  # gated FFN: act(x W_gate) * (x W_up)
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    embedding_multiplier: float = 1.0  # Grok-1 scales the embeddings
    output_multiplier: float = 1.0  # Grok-1 scales the logits
    init_std: float = 0.02
    # torch.utils.checkpoint around every block in training: recompute activations in backward.
    activation_checkpointing: bool = False
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    mtp: MTPConfig | None = None  # DeepSeek-V3 multi-token prediction modules (training; drafts for decoding)

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):
            self.attention = from_dict(AttentionConfig, self.attention, "attention")
        if isinstance(self.moe, dict):
            self.moe = from_dict(MoEConfig, self.moe, "moe")
        if isinstance(self.mtp, dict):
            self.mtp = from_dict(MTPConfig, self.mtp, "mtp")
        for name in ("vocab_size", "d_model", "num_layers", "max_seq_len", "dense_ffn_dim"):
            check_positive(name, getattr(self, name))
        biggest = max(self.vocab_size, self.dense_ffn_dim, 3 * self.attention.num_heads * (self.attention.head_dim or 1),
                      (self.moe.num_experts * self.moe.expert_ffn_dim) if self.moe is not None else 0) * self.d_model
        if biggest >= 2**62:
            raise ConfigError("d_model", self.d_model, f"with these sizes one weight would hold {biggest:.3g} values, "
                              "more than a tensor can; shrink the model")
        check_choice("norm", self.norm, NORM_TYPES)
        check_positive("norm_eps", self.norm_eps)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_positive("init_std", self.init_std)
        window = self.attention.sliding_window
        if window is not None and window > self.max_seq_len:
            raise ConfigError("attention.sliding_window", window,
                              f"is larger than the context (max_seq_len={self.max_seq_len}), so it never limits "
                              "attention; remove it (full attention) or use a window <= max_seq_len")
        if self.attention.mla is None and self.attention.head_dim is None and self.d_model % self.attention.num_heads:
            raise ConfigError(
                "attention.num_heads", self.attention.num_heads,
                f"must divide d_model={self.d_model}, or set attention.head_dim explicitly",
            )
        if self.attention.mla is None and self.head_dim % 2:
            raise ConfigError("attention.head_dim", self.head_dim, "d_model / num_heads must be even for RoPE")
        if self.attention.rope_type == "longrope":
            for name in ("rope_short_factor", "rope_long_factor"):
                n = len(getattr(self.attention, name))
                if n != self.rope_dim // 2:
                    raise ConfigError(f"attention.{name}", f"{n} factors",
                                      f"needs head_dim / 2 = {self.rope_dim // 2} factors (one per RoPE frequency)")
        if self.attention.window_layers is not None:
            n_mtp = self.mtp.num_modules if self.mtp is not None else 0
            for i in self.attention.window_layers:
                if i >= self.num_layers + n_mtp:
                    bound = f"num_layers={self.num_layers}" + (f" + mtp.num_modules={n_mtp}" if n_mtp else "")
                    raise ConfigError("attention.window_layers", i, f"layer index must be < {bound}")
        if self.moe is not None and self.moe.aoe is not None and self.moe.aoe.d_low >= self.d_model:
            raise ConfigError("moe.aoe.d_low", self.moe.aoe.d_low,
                              f"must be < d_model={self.d_model} (W_g = W_down W_up is a low-rank factorisation; "
                              f"the paper uses about d_model / 3)")
        if self.moe is not None:
            for i in self.moe.dense_layers:
                if i >= self.num_layers:
                    raise ConfigError("moe.dense_layers", i, f"layer index must be < num_layers={self.num_layers}")
            if not any(self.moe.is_moe_layer(i) for i in range(self.num_layers)):
                raise ConfigError(
                    "moe", "no MoE layer",
                    "first_k_dense / moe_every / dense_layers leave no MoE layer; set moe: null for a dense model",
                )

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.num_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: head_dim, or MLA's decoupled qk_rope_head_dim."""
        mla = self.attention.mla
        return self.head_dim if mla is None else mla.qk_rope_head_dim

    def kv_cache_values_per_token(self) -> int:
        """Numbers the KV cache keeps per token, summed over layers: 2 * kv_heads * head_dim per layer
        for MHA / GQA / MQA, kv_lora_rank + qk_rope_head_dim for MLA (DeepSeek-V2 Table 1)."""
        mla = self.attention.mla
        per_layer = (mla.kv_lora_rank + mla.qk_rope_head_dim) if mla else 2 * self.attention.kv_heads * self.head_dim
        return per_layer * self.num_layers

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes per token at a given element size (2: bf16/fp16, 4: fp32); MTP modules excluded."""
        return self.kv_cache_values_per_token() * dtype_bytes

    def attention_kind(self) -> str:
        """'MLA', 'MHA', 'MQA' or 'GQA'."""
        a = self.attention
        if a.mla is not None:
            return "MLA"
        return "MHA" if a.kv_heads == a.num_heads else "MQA" if a.kv_heads == 1 else "GQA"

    @property
    def aoe_d_wide(self) -> int | None:
        """The AoE experts' d_wide (given, or eq. 5 from expert_ffn_dim); None without AoE."""
        if self.moe is None or self.moe.aoe is None:
            return None
        a = self.moe.aoe
        return a.d_wide if a.d_wide is not None else aoe_d_wide(self.d_model, self.moe.expert_ffn_dim, a.d_low)

    def rope_mscales(self) -> tuple[float, float]:
        """LongRoPE's (short, long) cos/sin multipliers, the unset ones at the LongRoPE default
        sqrt(1 + ln(s) / ln(L)), s = max_seq_len / L, L = rope_original_max_len (as HF's
        ``_compute_longrope_parameters`` attention factor). (1.0, 1.0) for plain RoPE."""
        a = self.attention
        if a.rope_type != "longrope":
            return 1.0, 1.0
        s = self.max_seq_len / a.rope_original_max_len
        default = math.sqrt(1 + math.log(s) / math.log(a.rope_original_max_len)) if s > 1.0 else 1.0
        return (default if a.rope_short_mscale is None else a.rope_short_mscale,
                default if a.rope_long_mscale is None else a.rope_long_mscale)

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i's attention (None: full attention): attention.sliding_window on
        the layers in attention.window_layers, or on every layer when that is None."""
        a = self.attention
        if a.window_layers is not None and i not in a.window_layers:
            return None
        return a.sliding_window

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(i)

    def layer_types(self) -> list[str]:
        """'moe' or 'dense' for every block, in order."""
        return ["moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_layers)]

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data, "")
