"""Tiny random Hugging Face MoE models, one list of configs per family, each exercising options.

Every model is built by ``transformers`` itself (seeded), with all 1-D parameters (norm weights,
biases) perturbed so that they are tested too, and router weights scaled up so routing is decisive:
different tokens take different experts and no top-k decision sits on a near-tie.
"""

from __future__ import annotations

import torch

V, D, T = 96, 32, 12
LLAMA = dict(vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _factors(n: int, seed: int, spread: float) -> list[float]:
    """n LongRoPE factors in [1, 1 + spread), seeded: non-trivial, different per frequency."""
    return (1.0 + spread * torch.rand(n, generator=torch.Generator().manual_seed(seed))).tolist()


# Phi-3.5-MoE's LongRoPE with a 16-token "pretraining context", so that both of HF's mscale branches
# (sequence <= 16: short_mscale, longer: long_mscale) are reachable with tiny inputs; head_dim 16: 8 factors.
LONGROPE = {"type": "longrope", "short_factor": _factors(8, 0, 1.0), "long_factor": _factors(8, 1, 3.0),
            "short_mscale": 1.3, "long_mscale": 1.7, "original_max_position_embeddings": 16}

# DeepSeek-V2 / V3: MLA (q latent 12 or none, kv latent 16, 8 + 4 / 8 head dims), 8 routed experts of F=16
# plus 2 shared, top-2, first layer dense.
DEEPSEEK = dict(vocab_size=V, hidden_size=D, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
                n_shared_experts=2, max_position_embeddings=64)
# YaRN x4 over a 16-token "pretraining context", mscale = mscale_all_dim = 0.707 (DeepSeek-V2's): cos/sin
# factor 1, MLA softmax scale x (0.1 * 0.707 * ln 4 + 1)^2.
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}

# (family, variant name, config kwargs)
VARIANTS = [
    ("mixtral", "gqa", dict(LLAMA, num_local_experts=4, num_experts_per_tok=2)),
    ("mixtral", "swa-tied-headdim-top1", dict(LLAMA, num_local_experts=3, num_experts_per_tok=1, sliding_window=5,
                                              tie_word_embeddings=True, head_dim=16, rope_theta=500.0,
                                              num_key_value_heads=4)),
    ("mixtral", "gelu-top3", dict(LLAMA, num_local_experts=5, num_experts_per_tok=3, hidden_act="gelu_pytorch_tanh",
                                  num_key_value_heads=1, rms_norm_eps=1e-6)),
    ("phimoe", "biases", dict(LLAMA, num_local_experts=4, attention_bias=True, lm_head_bias=True)),
    ("phimoe", "swa-wide-mask", dict(LLAMA, num_local_experts=6, sliding_window=4, router_jitter_noise=0.3,
                                     num_hidden_layers=3)),
    ("phimoe", "longrope", dict(LLAMA, num_local_experts=4, head_dim=16, rope_theta=1e4, rope_scaling=LONGROPE,
                                attention_bias=True)),
    ("dbrx", "clip-l1", dict(d_model=D, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=64,
                             rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                             attn_config=dict(kv_n_heads=2, clip_qkv=0.06, rope_theta=5e5),
                             ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2))),
    ("dbrx", "mqa-nonorm-top3", dict(d_model=D, n_heads=4, n_layers=3, vocab_size=V, max_seq_len=64,
                                     # NOTE: transformers 5.23 DBRX crashes with clip_qkv=None (clamp(None, None))
                                     attn_config=dict(kv_n_heads=1, rope_theta=10000.0, clip_qkv=100.0),
                                     ffn_config=dict(ffn_hidden_size=16, moe_num_experts=5, moe_top_k=3,
                                                     moe_normalize_expert_weights=None))),
    # gates divided by their L2 / L0.5 norm (transformers' torch.norm(p=moe_normalize_expert_weights))
    ("dbrx", "pnorm2", dict(d_model=D, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=64,
                            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                            ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2,
                                            moe_normalize_expert_weights=2.0))),
    ("dbrx", "pnorm0.5-top3", dict(d_model=D, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=64,
                                   attn_config=dict(kv_n_heads=4, rope_theta=10000.0, clip_qkv=8.0),
                                   ffn_config=dict(ffn_hidden_size=16, moe_num_experts=6, moe_top_k=3,
                                                   moe_normalize_expert_weights=0.5))),
    ("qwen2_moe", "bias-no-renorm", dict(LLAMA, moe_intermediate_size=16, shared_expert_intermediate_size=20,
                                         num_experts=4, num_experts_per_tok=2)),
    ("qwen2_moe", "sparse-step-mlp-only-renorm-tied", dict(
        LLAMA, num_hidden_layers=4, moe_intermediate_size=16, shared_expert_intermediate_size=40, num_experts=6,
        num_experts_per_tok=3, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True,
        tie_word_embeddings=True, qkv_bias=False)),
    # layers 0 and 2 slide (the even layers below max_window_layers), layer 1 attends fully
    ("qwen2_moe", "swa-max-window-layers", dict(
        LLAMA, num_hidden_layers=3, moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=4,
        num_experts_per_tok=2, use_sliding_window=True, sliding_window=4, max_window_layers=3)),
    ("qwen3_moe", "headdim-renorm", dict(LLAMA, head_dim=16, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=True)),
    ("qwen3_moe", "mlp-only-bias-swa", dict(LLAMA, num_hidden_layers=3, moe_intermediate_size=16, num_experts=5,
                                            num_experts_per_tok=2, mlp_only_layers=[1], attention_bias=True,
                                            use_sliding_window=True, sliding_window=4)),
    ("olmoe", "clip-no-renorm", dict(LLAMA, num_experts=4, num_experts_per_tok=2, clip_qkv=0.5)),
    ("olmoe", "bias-renorm-tied", dict(LLAMA, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                                       attention_bias=True, tie_word_embeddings=True, num_key_value_heads=4)),
    ("deepseek_v2", "qlora-groups-scaled", dict(DEEPSEEK, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                                                routed_scaling_factor=1.5)),
    ("deepseek_v2", "lite-yarn-bias-top3", dict(DEEPSEEK, q_lora_rank=None, rope_parameters=YARN, attention_bias=True,
                                                num_experts_per_tok=3, n_shared_experts=1)),
    ("deepseek_v3", "groups-renorm-yarn-interleaved", dict(DEEPSEEK, n_group=2, topk_group=1, norm_topk_prob=True,
                                                           rope_interleave=True, rope_parameters=YARN)),
    ("deepseek_v3", "no-renorm-half-split-tied", dict(DEEPSEEK, n_group=4, topk_group=2, norm_topk_prob=False,
                                                      rope_interleave=False, routed_scaling_factor=1.0,
                                                      tie_word_embeddings=True, num_nextn_predict_layers=0)),
    ("deepseek_v3", "lite-yarn-half-split-bias", dict(DEEPSEEK, q_lora_rank=None, n_group=2, topk_group=1,
                                                      rope_interleave=False, rope_parameters=YARN,
                                                      attention_bias=True)),
]


def hf_config(family: str, kwargs: dict):
    import transformers

    return transformers.AutoConfig.for_model(family, **kwargs)


def is_router(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and (name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight")
                            or name.endswith("router.weight") or name.endswith("router.layer.weight"))


def build_hf_model(family: str, kwargs: dict, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
            elif is_router(name, p):
                p.normal_(0.0, 1.0)  # logits of std ~ sqrt(D) ~ 6: decisive routing
            elif name.endswith(("embed_tokens.weight", "wte.weight")):
                p.normal_(0.0, 1.0)  # token identity dominates the residual stream in every layer
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias (HF inits it to 0)
                b.normal_(0.0, 0.5)
    return model


def input_ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (2, T), generator=g)


def max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| divided by the logit scale max |ref|."""
    return ((out - ref).abs().max() / ref.abs().max()).item()
