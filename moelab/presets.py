"""Model presets addressable by short name (``moelab params mixtral-8x7b``, ``--preset tiny``).

Each preset is the real architecture (norm type, biases, head_dim, tying, vocab, routing form), not
only the sizes. ``PUBLISHED`` holds the parameter counts the authors state, with their source; the
counts moelab computes (``moelab params``) are tested against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moelab.config import AoEConfig, AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.errors import ConfigError


def tiny() -> ModelConfig:
    """A 4-layer, 8-expert top-2 MoE that trains on 2 CPU cores in minutes (the `make demo` model)."""
    return ModelConfig(
        vocab_size=2048, d_model=128, num_layers=4, max_seq_len=256, dense_ffn_dim=512,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        moe=MoEConfig(num_experts=8, expert_ffn_dim=256,
                      router=RouterConfig(top_k=2, load_balance_coef=0.01, z_loss_coef=1e-3)),
    )


def mixtral_8x7b() -> ModelConfig:
    """Mixtral 8x7B (Jiang et al. 2024, Table 1; HF mistralai/Mixtral-8x7B-v0.1 config.json):
    no sliding window, RoPE theta 1e6, untied, router_aux_loss_coef 0.02."""
    return ModelConfig(
        vocab_size=32000, d_model=4096, num_layers=32, max_seq_len=32768, dense_ffn_dim=14336,
        attention=AttentionConfig(num_heads=32, num_kv_heads=8, rope_theta=1e6),
        moe=MoEConfig(num_experts=8, expert_ffn_dim=14336, router=RouterConfig(top_k=2, load_balance_coef=0.02)),
    )


def mixtral_8x22b() -> ModelConfig:
    """Mixtral 8x22B v0.1 (HF mistralai/Mixtral-8x22B-v0.1 config.json): vocab 32000 (v0.3: 32768)."""
    return ModelConfig(
        vocab_size=32000, d_model=6144, num_layers=56, max_seq_len=65536, dense_ffn_dim=16384,
        attention=AttentionConfig(num_heads=48, num_kv_heads=8, rope_theta=1e6),
        moe=MoEConfig(num_experts=8, expert_ffn_dim=16384, router=RouterConfig(top_k=2, load_balance_coef=0.001)),
    )


def dbrx() -> ModelConfig:
    """DBRX (HF databricks/dbrx-base config.json): LayerNorm without bias, clip_qkv 8, RoPE 5e5,
    16 experts top-4 with gates divided by their L1 norm (moe_normalize_expert_weights = 1)."""
    return ModelConfig(
        vocab_size=100352, d_model=6144, num_layers=40, max_seq_len=32768, dense_ffn_dim=10752,
        norm="layernorm", norm_bias=False,
        attention=AttentionConfig(num_heads=48, num_kv_heads=8, rope_theta=5e5, clip_qkv=8.0),
        moe=MoEConfig(num_experts=16, expert_ffn_dim=10752, router=RouterConfig(
            top_k=4, softmax_order="softmax_then_topk", norm_topk_prob=True, load_balance_coef=0.05)),
    )


def grok_1() -> ModelConfig:
    """Grok-1 (xai-org/grok-1 model.py; config.json in kamanphoebe/Look-into-MoEs): tied embeddings
    scaled by 78.38, logits by 0.577, attention logits soft-capped at 30, RMSNorm before and after
    attention and FFN, GeLU-gated experts, softmax then top-2 without renormalisation."""
    return ModelConfig(
        vocab_size=131072, d_model=6144, num_layers=64, max_seq_len=8192, dense_ffn_dim=32768,
        sandwich_norm=True, activation="gelu_tanh", tie_embeddings=True,
        embedding_multiplier=78.38367176906169, output_multiplier=0.5773502691896257,
        attention=AttentionConfig(num_heads=48, num_kv_heads=8, logit_softcap=30.0),
        moe=MoEConfig(num_experts=8, expert_ffn_dim=32768, router=RouterConfig(
            top_k=2, softmax_order="softmax_then_topk", load_balance_coef=0.001)),
    )


def olmoe_1b_7b() -> ModelConfig:
    """OLMoE-1B-7B (Muennighoff et al. 2024; HF allenai/OLMoE-1B-7B-0924): q/k RMSNorm over all heads,
    64 experts of F=1024 top-8 without renormalisation, aux 0.01, z 0.001, dropless."""
    return ModelConfig(
        vocab_size=50304, d_model=2048, num_layers=16, max_seq_len=4096, dense_ffn_dim=1024,
        attention=AttentionConfig(num_heads=16, qk_norm="full"),
        moe=MoEConfig(num_experts=64, expert_ffn_dim=1024, router=RouterConfig(
            top_k=8, softmax_order="softmax_then_topk", load_balance_coef=0.01, z_loss_coef=0.001)),
    )


def qwen3_30b_a3b() -> ModelConfig:
    """Qwen3-30B-A3B (HF Qwen/Qwen3-30B-A3B config.json): explicit head_dim 128 (32*128 != 2048),
    per-head q/k RMSNorm, 128 experts top-8 renormalised (norm_topk_prob true in the hub config)."""
    return ModelConfig(
        vocab_size=151936, d_model=2048, num_layers=48, max_seq_len=40960, dense_ffn_dim=6144, norm_eps=1e-6,
        attention=AttentionConfig(num_heads=32, num_kv_heads=4, head_dim=128, rope_theta=1e6, qk_norm="per_head"),
        moe=MoEConfig(num_experts=128, expert_ffn_dim=768, router=RouterConfig(
            top_k=8, softmax_order="softmax_then_topk", norm_topk_prob=True, load_balance_coef=0.001)),
    )


def qwen1_5_moe_a2_7b() -> ModelConfig:
    """Qwen1.5-MoE-A2.7B (HF Qwen/Qwen1.5-MoE-A2.7B config.json): qkv bias, 60 experts top-4 without
    renormalisation, one shared expert of F=5632 scaled by a sigmoid gate."""
    return ModelConfig(
        vocab_size=151936, d_model=2048, num_layers=24, max_seq_len=8192, dense_ffn_dim=5632, norm_eps=1e-6,
        attention=AttentionConfig(num_heads=16, rope_theta=1e6, qkv_bias=True),
        moe=MoEConfig(num_experts=60, expert_ffn_dim=1408, num_shared_experts=1, shared_expert_ffn_dim=5632,
                      shared_expert_gate=True, router=RouterConfig(
                          top_k=4, softmax_order="softmax_then_topk", load_balance_coef=0.001)),
    )


def phi_3_5_moe() -> ModelConfig:
    """Phi-3.5-MoE (HF microsoft/Phi-3.5-MoE-instruct config.json): LayerNorm with bias, biases on
    q/k/v/o and the LM head (true in the hub config, false in the HF class), 16 experts routed by
    SparseMixer top-2 (router_jitter_noise 0.01 is its epsilon; input_jitter_noise 0.01).
    NOTE: the hub config's LongRoPE factors are not part of this preset (plain RoPE); load the real
    config.json with ``moelab.load`` / ``moelab params`` to get them. Counts are unaffected."""
    return ModelConfig(
        vocab_size=32064, d_model=4096, num_layers=32, max_seq_len=131072, dense_ffn_dim=6400,
        norm="layernorm", lm_head_bias=True,
        attention=AttentionConfig(num_heads=32, num_kv_heads=8, rope_theta=10000.0, qkv_bias=True, out_bias=True),
        moe=MoEConfig(num_experts=16, expert_ffn_dim=6400, router=RouterConfig(
            type="sparsemixer", top_k=2, sparsemixer_eps=0.01, jitter_eps=0.01, load_balance_coef=0.001)),
    )


def deepseek_moe_16b() -> ModelConfig:
    """DeepSeekMoE 16B (Dai et al. 2024 §5; HF deepseek-ai/deepseek-moe-16b-base config.json):
    fine-grained experts (64 routed of F=1408, top-6) plus 2 shared experts, first layer dense
    (F=10944), softmax then top-k without renormalisation, alpha1 = 0.001."""
    return ModelConfig(
        vocab_size=102400, d_model=2048, num_layers=28, max_seq_len=4096, dense_ffn_dim=10944, norm_eps=1e-6,
        attention=AttentionConfig(num_heads=16),
        moe=MoEConfig(num_experts=64, expert_ffn_dim=1408, num_shared_experts=2, first_k_dense=1,
                      router=RouterConfig(top_k=6, softmax_order="softmax_then_topk", load_balance_coef=0.001)),
    )


# AoE eq. 6 sums f over the K choices of a token (f sums to K), so its alpha_aux = 0.01 is
# 0.01 * K in moelab's Switch loss, whose f sums to 1.
AOE_AUX = 0.01


def aoe_732m() -> ModelConfig:
    """AoE small model (Lv et al. 2025 §4.1.1): 12 layers, 12 heads, d_model 768, 8 experts top-2 of
    dense-equivalent d_ffn 3072, Llama vocab 32000, pre-RMSNorm, d_low 256 (the paper's best; d_wide
    3840 by eq. 5), L_aux 0.01. Tying is not stated; the published 732M total fits a tied embedding."""
    return ModelConfig(
        vocab_size=32000, d_model=768, num_layers=12, max_seq_len=2048, dense_ffn_dim=3072, tie_embeddings=True,
        attention=AttentionConfig(num_heads=12),
        moe=MoEConfig(num_experts=8, expert_ffn_dim=3072, aoe=AoEConfig(d_low=256),
                      router=RouterConfig(top_k=2, load_balance_coef=AOE_AUX * 2)),
    )


def aoe_4b() -> ModelConfig:
    """AoE large model (§4.2): 24 layers, 20 heads, d_model 1280, 8 experts top-2 of d_ffn 5120,
    d_low 400, d_wide 6470 as the paper states (eq. 5 gives 6469.2), L_aux 0.01, tied."""
    return ModelConfig(
        vocab_size=32000, d_model=1280, num_layers=24, max_seq_len=2048, dense_ffn_dim=5120, tie_embeddings=True,
        attention=AttentionConfig(num_heads=20),
        moe=MoEConfig(num_experts=8, expert_ffn_dim=5120, aoe=AoEConfig(d_low=400, d_wide=6470),
                      router=RouterConfig(top_k=2, load_balance_coef=AOE_AUX * 2)),
    )


def aoe_tiny() -> ModelConfig:
    """The `tiny` model with AoE experts (d_low = d_model / 4, d_wide by eq. 5: the same parameters
    per expert): trains on 2 CPU cores in minutes."""
    cfg = tiny()
    cfg.moe = MoEConfig(num_experts=8, expert_ffn_dim=256, aoe=AoEConfig(d_low=32),
                        router=RouterConfig(top_k=2, load_balance_coef=AOE_AUX * 2))
    return cfg


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "mixtral-8x7b": mixtral_8x7b,
    "mixtral-8x22b": mixtral_8x22b,
    "dbrx": dbrx,
    "grok-1": grok_1,
    "olmoe-1b-7b": olmoe_1b_7b,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "qwen1.5-moe-a2.7b": qwen1_5_moe_a2_7b,
    "phi-3.5-moe": phi_3_5_moe,
    "deepseek-moe-16b": deepseek_moe_16b,
    "aoe-tiny": aoe_tiny,
    "aoe-732m": aoe_732m,
    "aoe-4b": aoe_4b,
}


@dataclass(frozen=True)
class Published:
    """Parameter counts as their authors state them ("46.7B"), kept as text so the precision they
    were given with is known: "36B" means anything in [35.5B, 36.5B)."""

    total: str
    active: str | None
    source: str
    # "moelab": the active count follows moelab's convention (README); "paper": it counts a tied
    # embedding twice (input and output head) and only the K chosen experts
    # (ParamCount.active_params_paper).
    active_convention: str = "moelab"

    @staticmethod
    def value_and_half_ulp(text: str) -> tuple[float, float]:
        """'12.9B' -> (12.9e9, 0.05e9): the number and half a unit of its last published digit."""
        scale = {"B": 1e9, "M": 1e6}[text[-1]]
        digits = text[:-1]
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        return float(digits) * scale, 0.5 * 10.0 ** (-decimals) * scale


PUBLISHED: dict[str, Published] = {
    "mixtral-8x7b": Published("46.7B", "12.9B", "Mixtral paper (arXiv 2401.04088) §2: 46.7B total, 12.9B active"),
    "mixtral-8x22b": Published("141B", "39B", "Mistral AI announcement of Mixtral 8x22B: 141B total, 39B active"),
    "dbrx": Published("132B", "36B", "Databricks DBRX model card: 132B total, 36B active"),
    "grok-1": Published("314B", None, "xAI Grok-1 release: 314B parameters (no active count published)"),
    "olmoe-1b-7b": Published("6.9B", "1.3B", "OLMoE paper (arXiv 2409.02060): 6.9B total, 1.3B active"),
    "qwen3-30b-a3b": Published("30.5B", "3.3B", "Qwen3-30B-A3B model card: 30.5B total, 3.3B activated"),
    "qwen1.5-moe-a2.7b": Published("14.3B", "2.7B", "Qwen1.5-MoE-A2.7B model card: 14.3B total, 2.7B activated"),
    "phi-3.5-moe": Published("41.9B", "6.6B", "Phi-3.5-MoE model card: 41.9B total, 6.6B active"),
    "deepseek-moe-16b": Published("16.4B", "2.8B", "DeepSeekMoE paper (arXiv 2401.06066) §5: 16.4B total, 2.8B active"),
    "aoe-732m": Published("732M", "247M", "AoE paper (arXiv 2501.13074) §4.1.1: 732M total, 247M active",
                          active_convention="paper"),
    "aoe-4b": Published("4B", "1.18B", "AoE paper (arXiv 2501.13074) §4.2: 4B total, 1.18B active",
                        active_convention="paper"),
}


def get_preset(name: str) -> ModelConfig:
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise ConfigError("preset", name, f"unknown preset; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]()
