"""OLMoE (Muennighoff et al. 2024; HF ``modeling_olmoe``): RMSNorm, q/k RMSNorm over the full
projection width before the head split (moelab ``qk_norm="full"``), optional ``clip_qkv`` applied
after that norm, optional q/k/v/o bias (``attention_bias``), every layer an MoE with a softmax ->
top-k router and optional ``norm_topk_prob``.

HF checkpoint keys: model.layers.{i}.mlp.gate.weight, mlp.experts.{e}.{gate,up,down}_proj.weight,
self_attn.q_norm.weight (H*Dh,), self_attn.k_norm.weight (G*Dh,).
"""

from __future__ import annotations

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.interop.hf.common import (Adapter, UnsupportedForFamily, common_export_problems, lb_coef_from_hf,
                                      lb_coef_to_hf, llama_attention_rules, llama_global_rules, llama_norm_rules,
                                      moe_layer_problems, norm_topk_prob_of, qwen_style_moe_rules, read_llama_common,
                                      topk_router_problems, write_llama_common)
from moelab.interop.hf.config_reader import HFConfig


class OlmoeAdapter(Adapter):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"

    def to_moelab(self, hf: HFConfig) -> ModelConfig:
        c = read_llama_common(hf, default_theta=10000.0, eps_default=1e-5)
        if c.head_dim is not None:  # HF sizes q_norm by hidden_size, so only the default head_dim works
            raise hf.error("head_dim", c.head_dim, "OLMoE needs head_dim == hidden_size / num_attention_heads")
        E = hf.take_int("num_experts", 64, "num_local_experts")
        F_ = hf.take_int("intermediate_size", 2048)  # the expert width (no dense layers)
        K = hf.take_int("num_experts_per_tok", 8)
        clip = hf.take("clip_qkv", None)
        if clip is not None:
            clip = hf.take_float("clip_qkv", minimum=0.0, allow_equal=False)
        bias = hf.take_bool("attention_bias", False)
        router = RouterConfig(
            type="topk", top_k=K, softmax_order="softmax_then_topk",
            norm_topk_prob=hf.take_bool("norm_topk_prob", False),
            load_balance_coef=lb_coef_from_hf(hf.take_float("router_aux_loss_coef", 0.01), K, c.num_layers))
        return ModelConfig(
            vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.num_layers, max_seq_len=c.max_seq_len,
            dense_ffn_dim=F_, norm="rmsnorm", norm_eps=c.norm_eps,
            activation=c.activation, tie_embeddings=c.tie, init_std=c.init_std,
            attention=AttentionConfig(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, rope_theta=c.rope_theta,
                                      qkv_bias=bias, out_bias=bias, qk_norm="full", clip_qkv=clip),
            moe=MoEConfig(num_experts=E, expert_ffn_dim=F_, router=router))

    def from_moelab(self, cfg: ModelConfig) -> dict:
        p = common_export_problems(cfg)
        if not p:
            a, m = cfg.attention, cfg.moe
            p += topk_router_problems(cfg) + moe_layer_problems(cfg)
            if cfg.norm != "rmsnorm":
                p.append("norm=layernorm")
            if m.num_shared_experts:
                p.append("shared experts")
            if a.qkv_bias != a.out_bias or cfg.lm_head_bias:
                p.append("q/k/v bias without the output bias (or the reverse), or an LM-head bias")
            if a.qk_norm != "full":
                p.append("q/k norm other than full-width (OLMoE always has it)")
            if a.head_dim is not None and a.head_dim * a.num_heads != cfg.d_model:
                p.append("head_dim != d_model / num_heads")
            if a.sliding_window is not None:
                p.append("sliding_window")
        if p:
            raise UnsupportedForFamily(self.model_type, p)
        m = cfg.moe
        out = {**write_llama_common(cfg), "intermediate_size": m.expert_ffn_dim, "num_experts": m.num_experts,
               "num_experts_per_tok": m.router.top_k, "norm_topk_prob": norm_topk_prob_of(cfg),
               "attention_bias": cfg.attention.qkv_bias, "clip_qkv": cfg.attention.clip_qkv,
               "router_aux_loss_coef": lb_coef_to_hf(cfg)}
        out.pop("head_dim")
        return out

    def global_rules(self, cfg: ModelConfig):
        return llama_global_rules()

    def layer_rules(self, cfg: ModelConfig):
        return llama_attention_rules() + llama_norm_rules() + qwen_style_moe_rules(cfg.moe.num_experts)
