"""Qwen3-MoE (HF ``modeling_qwen3_moe``): RMSNorm, per-head q/k RMSNorm (moelab ``qk_norm="per_head"``),
optional q/k/v/o bias (``attention_bias``), explicit ``head_dim``, softmax -> top-k router with
``norm_topk_prob``, no shared expert, ``decoder_sparse_step`` / ``mlp_only_layers`` as Qwen2-MoE,
optional sliding window on all layers (``use_sliding_window``).

HF checkpoint keys: as Qwen2-MoE without the shared expert, plus self_attn.{q,k}_norm.weight (head_dim,).
"""

from __future__ import annotations

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.interop.hf.common import (Adapter, UnsupportedForFamily, common_export_problems, lb_coef_from_hf,
                                      lb_coef_to_hf, llama_attention_rules, llama_global_rules, llama_norm_rules,
                                      norm_topk_prob_of, qwen_layer_pattern, qwen_layer_pattern_to_hf,
                                      qwen_style_moe_rules, read_llama_common, topk_router_problems,
                                      write_llama_common)
from moelab.interop.hf.config_reader import HFConfig


class Qwen3MoeAdapter(Adapter):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def to_moelab(self, hf: HFConfig) -> ModelConfig:
        c = read_llama_common(hf, default_theta=10000.0, eps_default=1e-6)
        E = hf.take_int("num_experts", 128, "num_local_experts", minimum=0)
        K = hf.take_int("num_experts_per_tok", 8)
        pattern = qwen_layer_pattern(hf, c.num_layers, E)
        bias = hf.take_bool("attention_bias", False)
        use_window = hf.take_bool("use_sliding_window", False)
        window = hf.take("sliding_window", None) if use_window else None
        if use_window:
            window = hf.take_int("sliding_window")
        hf.ignore("sliding_window")  # HF sets it to None unless use_sliding_window
        hf.ignore("max_window_layers")  # hub field that Qwen3MoeConfig does not read
        F_ = hf.take_int("moe_intermediate_size", 768)
        norm_topk = hf.take_bool("norm_topk_prob", False)
        aux = hf.take_float("router_aux_loss_coef", 0.001)
        moe = None
        if pattern["any_moe"]:
            moe = MoEConfig(
                num_experts=E, expert_ffn_dim=F_, moe_every=pattern["moe_every"], dense_layers=pattern["dense_layers"],
                router=RouterConfig(type="topk", top_k=K, softmax_order="softmax_then_topk", norm_topk_prob=norm_topk,
                                    load_balance_coef=lb_coef_from_hf(aux, K, pattern["num_moe_layers"])))
        return ModelConfig(
            vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.num_layers, max_seq_len=c.max_seq_len,
            dense_ffn_dim=hf.take_int("intermediate_size", 6144), norm="rmsnorm", norm_eps=c.norm_eps,
            activation=c.activation, tie_embeddings=c.tie, init_std=c.init_std,
            attention=AttentionConfig(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                      rope_theta=c.rope_theta, sliding_window=window, qkv_bias=bias, out_bias=bias,
                                      qk_norm="per_head"),
            moe=moe)

    def from_moelab(self, cfg: ModelConfig) -> dict:
        p = common_export_problems(cfg)
        pattern = {}
        if not p:
            a, m = cfg.attention, cfg.moe
            p += topk_router_problems(cfg)
            pattern, more = qwen_layer_pattern_to_hf(cfg)
            p += more
            if cfg.norm != "rmsnorm":
                p.append("norm=layernorm")
            if m.num_shared_experts:
                p.append("shared experts")
            if a.qkv_bias != a.out_bias or cfg.lm_head_bias:
                p.append("q/k/v bias without the output bias (or the reverse), or an LM-head bias")
            if a.qk_norm != "per_head":
                p.append("q/k norm other than per-head (Qwen3-MoE always has it)")
            if a.clip_qkv is not None:
                p.append("clip_qkv")
        if p:
            raise UnsupportedForFamily(self.model_type, p)
        m = cfg.moe
        window = cfg.attention.sliding_window
        return {**write_llama_common(cfg), **pattern, "intermediate_size": cfg.dense_ffn_dim,
                "moe_intermediate_size": m.expert_ffn_dim, "num_experts": m.num_experts,
                "num_experts_per_tok": m.router.top_k, "norm_topk_prob": norm_topk_prob_of(cfg),
                "attention_bias": cfg.attention.qkv_bias, "use_sliding_window": window is not None,
                "sliding_window": window, "router_aux_loss_coef": lb_coef_to_hf(cfg)}

    def global_rules(self, cfg: ModelConfig):
        return llama_global_rules()

    def layer_rules(self, cfg: ModelConfig):
        E = cfg.moe.num_experts if cfg.moe else 0
        return llama_attention_rules() + llama_norm_rules() + qwen_style_moe_rules(E)
