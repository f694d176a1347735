"""Model presets addressable by short name (``moelab params mixtral-8x7b``, ``--preset tiny``).

Each preset is the real architecture (norm type, biases, head_dim, tying, vocab, routing form), not
only the sizes. ``PUBLISHED`` holds the parameter counts the authors state, with their source; the
counts moelab computes (``moelab params``) are tested against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moelab.config import (AoEConfig, AttentionConfig, MLAConfig, ModelConfig, MoEConfig, MTPConfig,
                           RouterConfig, YaRNConfig)
from moelab.config import load_balance_coef_from_hf as _hf_aux  # HF config.json's router_aux_loss_coef
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
    no sliding window, RoPE theta 1e6, untied, router_aux_loss_coef 0.02 (HF's convention; converted)."""
    return ModelConfig(
        vocab_size=32000, d_model=4096, num_layers=32, max_seq_len=32768, dense_ffn_dim=14336,
        attention=AttentionConfig(num_heads=32, num_kv_heads=8, rope_theta=1e6),
        moe=MoEConfig(num_experts=8, expert_ffn_dim=14336, router=RouterConfig(top_k=2, load_balance_coef=_hf_aux(0.02, 2, 32))),
    )


def mixtral_8x22b() -> ModelConfig:
    """Mixtral 8x22B v0.1 (HF mistralai/Mixtral-8x22B-v0.1 config.json): vocab 32000 (v0.3: 32768)."""
    return ModelConfig(
        vocab_size=32000, d_model=6144, num_layers=56, max_seq_len=65536, dense_ffn_dim=16384,
        attention=AttentionConfig(num_heads=48, num_kv_heads=8, rope_theta=1e6),
        moe=MoEConfig(num_experts=8, expert_ffn_dim=16384, router=RouterConfig(top_k=2, load_balance_coef=_hf_aux(0.001, 2, 56))),
    )


def dbrx() -> ModelConfig:
    """DBRX (HF databricks/dbrx-base config.json): LayerNorm without bias, clip_qkv 8, RoPE 5e5,
    16 experts top-4 with gates divided by their L1 norm (moe_normalize_expert_weights = 1)."""
    return ModelConfig(
        vocab_size=100352, d_model=6144, num_layers=40, max_seq_len=32768, dense_ffn_dim=10752,
        norm="layernorm", norm_bias=False,
        attention=AttentionConfig(num_heads=48, num_kv_heads=8, rope_theta=5e5, clip_qkv=8.0),
        moe=MoEConfig(num_experts=16, expert_ffn_dim=10752, router=RouterConfig(
            top_k=4, softmax_order="softmax_then_topk", norm_topk_prob=True, load_balance_coef=_hf_aux(0.05, 4, 40))),
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
            top_k=2, softmax_order="softmax_then_topk", load_balance_coef=_hf_aux(0.001, 2, 64))),
    )


def olmoe_1b_7b() -> ModelConfig:
    """OLMoE-1B-7B (Muennighoff et al. 2024; HF allenai/OLMoE-1B-7B-0924): q/k RMSNorm over all heads,
    64 experts of F=1024 top-8 without renormalisation, aux 0.01, z 0.001, dropless."""
    return ModelConfig(
        vocab_size=50304, d_model=2048, num_layers=16, max_seq_len=4096, dense_ffn_dim=1024,
        attention=AttentionConfig(num_heads=16, qk_norm="full"),
        moe=MoEConfig(num_experts=64, expert_ffn_dim=1024, router=RouterConfig(
            top_k=8, softmax_order="softmax_then_topk", load_balance_coef=_hf_aux(0.01, 8, 16), z_loss_coef=0.001)),
    )


def qwen3_30b_a3b() -> ModelConfig:
    """Qwen3-30B-A3B (HF Qwen/Qwen3-30B-A3B config.json): explicit head_dim 128 (32*128 != 2048),
    per-head q/k RMSNorm, 128 experts top-8 renormalised (norm_topk_prob true in the hub config)."""
    return ModelConfig(
        vocab_size=151936, d_model=2048, num_layers=48, max_seq_len=40960, dense_ffn_dim=6144, norm_eps=1e-6,
        attention=AttentionConfig(num_heads=32, num_kv_heads=4, head_dim=128, rope_theta=1e6, qk_norm="per_head"),
        moe=MoEConfig(num_experts=128, expert_ffn_dim=768, router=RouterConfig(
            top_k=8, softmax_order="softmax_then_topk", norm_topk_prob=True, load_balance_coef=_hf_aux(0.001, 8, 48))),
    )


def qwen1_5_moe_a2_7b() -> ModelConfig:
    """Qwen1.5-MoE-A2.7B (HF Qwen/Qwen1.5-MoE-A2.7B config.json): qkv bias, 60 experts top-4 without
    renormalisation, one shared expert of F=5632 scaled by a sigmoid gate."""
    return ModelConfig(
        vocab_size=151936, d_model=2048, num_layers=24, max_seq_len=8192, dense_ffn_dim=5632, norm_eps=1e-6,
        attention=AttentionConfig(num_heads=16, rope_theta=1e6, qkv_bias=True),
        moe=MoEConfig(num_experts=60, expert_ffn_dim=1408, num_shared_experts=1, shared_expert_ffn_dim=5632,
                      shared_expert_gate=True, router=RouterConfig(
                          top_k=4, softmax_order="softmax_then_topk", load_balance_coef=_hf_aux(0.001, 4, 24))),
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
            type="sparsemixer", top_k=2, sparsemixer_eps=0.01, jitter_eps=0.01,
            load_balance_coef=_hf_aux(0.001, 2, 32))),
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


# DeepSeek-V2 / V3 YaRN (V2 §3.1.4, V3 §4.3): factor 40 over a 4K pretraining context.
def _deepseek_yarn(mscale: float) -> YaRNConfig:
    return YaRNConfig(factor=40.0, original_max_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=mscale,
                      mscale_all_dim=mscale)


def deepseek_v2() -> ModelConfig:
    """DeepSeek-V2 236B (arXiv 2405.04434 §3.1.2; deepseek-ai/DeepSeek-V2 config.json): 60 layers,
    d 5120, MLA (128 heads, d_c 512, d'_c 1536, 128 + 64 / 128 head dims), first layer dense (F=12288),
    2 shared + 160 routed experts of F=1536, top-6 over 3 of 8 device groups (group max), gates x16,
    expert / device / communication balance 0.003 / 0.05 / 0.02 per sequence, YaRN to 160K."""
    return ModelConfig(
        vocab_size=102400, d_model=5120, num_layers=60, max_seq_len=163840, dense_ffn_dim=12288, norm_eps=1e-6,
        init_std=0.006,
        attention=AttentionConfig(num_heads=128, rope_type="yarn", yarn=_deepseek_yarn(0.707),
                                  mla=MLAConfig(kv_lora_rank=512, q_lora_rank=1536)),
        moe=MoEConfig(num_experts=160, expert_ffn_dim=1536, num_shared_experts=2, first_k_dense=1, moe_offset=0,
                      router=RouterConfig(type="deepseek_v2", top_k=6, n_group=8, topk_group=3,
                                          routed_scaling_factor=16.0)),
    )


def deepseek_v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite 15.7B (V2 paper App. B; deepseek-ai/DeepSeek-V2-Lite config.json): 27 layers,
    d 2048, MLA without query compression (16 heads, d_c 512), first layer dense (F=10944), 2 shared +
    64 routed experts of F=1408, top-6, no group limit, alpha1 = 0.001."""
    return ModelConfig(
        vocab_size=102400, d_model=2048, num_layers=27, max_seq_len=163840, dense_ffn_dim=10944, norm_eps=1e-6,
        attention=AttentionConfig(num_heads=16, rope_type="yarn", yarn=_deepseek_yarn(0.707),
                                  mla=MLAConfig(kv_lora_rank=512, q_lora_rank=None)),
        moe=MoEConfig(num_experts=64, expert_ffn_dim=1408, num_shared_experts=2, first_k_dense=1, moe_offset=0,
                      router=RouterConfig(type="deepseek_v2", top_k=6, expert_balance_coef=0.001)),
    )


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 671B (arXiv 2412.19437 §4.2; deepseek-ai/DeepSeek-V3 config.json): 61 layers,
    d 7168, MLA (128 heads, d_c 512, d'_c 1536), first 3 layers dense (F=18432), 1 shared + 256 routed
    experts of F=2048, sigmoid top-8 over 4 of 8 node groups (sum of the top-2 per group), gates
    normalised and x2.5, aux-loss-free bias (gamma 0.001) + sequence-wise balance 1e-4, YaRN to
    160K, one MTP module (lambda 0.3, then 0.1)."""
    return ModelConfig(
        vocab_size=129280, d_model=7168, num_layers=61, max_seq_len=163840, dense_ffn_dim=18432, norm_eps=1e-6,
        init_std=0.006,
        attention=AttentionConfig(num_heads=128, rope_type="yarn", yarn=_deepseek_yarn(1.0),
                                  mla=MLAConfig(kv_lora_rank=512, q_lora_rank=1536)),
        moe=MoEConfig(num_experts=256, expert_ffn_dim=2048, num_shared_experts=1, first_k_dense=3, moe_offset=0,
                      router=RouterConfig(type="deepseek_v3", top_k=8, n_group=8, topk_group=4,
                                          routed_scaling_factor=2.5)),
        mtp=MTPConfig(num_modules=1, loss_weight=0.3, final_loss_weight=0.1),
    )


def deepseek_v3_tiny() -> ModelConfig:
    """DeepSeek-V3's design at the `tiny` scale, trainable on 2 CPU cores: MLA (4 heads, d_c 64,
    d'_c 96, 32 + 16 / 32 head dims), the first layer dense, 1 shared + 16 fine-grained routed
    experts (F=128) top-4 over 2 of 4 groups, sigmoid gates with the aux-loss-free bias and the
    sequence-wise loss, one MTP module (lambda 0.3)."""
    cfg = tiny()
    cfg.dense_ffn_dim = 512
    cfg.attention = AttentionConfig(num_heads=4, mla=MLAConfig(kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32,
                                                               qk_rope_head_dim=16, v_head_dim=32))
    cfg.moe = MoEConfig(num_experts=16, expert_ffn_dim=128, num_shared_experts=1, first_k_dense=1, moe_offset=0,
                        router=RouterConfig(type="deepseek_v3", top_k=4, n_group=4, topk_group=2))
    cfg.mtp = MTPConfig(num_modules=1, loss_weight=0.3)
    return ModelConfig.from_dict(cfg.to_dict())  # validated as a whole


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
    "deepseek-v2": deepseek_v2,
    "deepseek-v2-lite": deepseek_v2_lite,
    "deepseek-v3": deepseek_v3,
    "deepseek-v3-tiny": deepseek_v3_tiny,
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
    # (ParamCount.active_params_paper); "no_input_embedding": moelab's count without the input
    # embedding (a lookup, no compute), which fits DeepSeek's V2-Lite 2.4B and V3 37B (README: 36.7B).
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
    "deepseek-v2": Published("236B", "21B", "DeepSeek-V2 paper (arXiv 2405.04434) §3.1.2: 236B total, 21B activated"),
    "deepseek-v2-lite": Published("15.7B", "2.4B", "DeepSeek-V2 paper App. B: 15.7B total, 2.4B activated",
                                  active_convention="no_input_embedding"),
    "deepseek-v3": Published("671B", "37B", "DeepSeek-V3 paper (arXiv 2412.19437) §4.2: 671B total, 37B activated "
                             "(the main model; the MTP module's 11.5B unique parameters are not included)",
                             active_convention="no_input_embedding"),
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
