"""Mixtral (Jiang et al. 2024; HF ``modeling_mixtral``): RMSNorm, GQA, optional sliding window, every
layer a top-k MoE whose router is softmax -> top-k -> renormalise (= moelab ``topk_then_softmax``).

HF checkpoint keys (per layer i, expert e):
  model.layers.{i}.block_sparse_moe.gate.weight            (E, D)  -> blocks.{i}.ffn.router.weight
  model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight  (F, D)  -> blocks.{i}.ffn.experts.gate_EFD[e]
  model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight  (F, D)  -> blocks.{i}.ffn.experts.up_EFD[e]
  model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight  (D, F)  -> blocks.{i}.ffn.experts.down_EDF[e]
"""

from __future__ import annotations

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.interop.hf.common import (Adapter, UnsupportedForFamily, common_export_problems, copy, lb_coef_from_hf,
                                      lb_coef_to_hf, llama_attention_rules, llama_global_rules, llama_norm_rules,
                                      moe_layer_problems, read_llama_common, stack, write_llama_common)
from moelab.interop.hf.config_reader import HFConfig

MOE = "model.layers.{i}.block_sparse_moe"


class MixtralAdapter(Adapter):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"

    def to_moelab(self, hf: HFConfig) -> ModelConfig:
        c = read_llama_common(hf, default_theta=1e6, eps_default=1e-5)
        E = hf.take_int("num_local_experts", 8, "num_experts")
        F_ = hf.take_int("intermediate_size", 14336)  # the expert width (no dense layers)
        K = hf.take_int("num_experts_per_tok", 2)
        window = hf.take("sliding_window", None)
        if window is not None:
            window = hf.take_int("sliding_window")
        router = RouterConfig(
            type="topk", top_k=K, softmax_order="topk_then_softmax",
            load_balance_coef=lb_coef_from_hf(hf.take_float("router_aux_loss_coef", 0.001), K, c.num_layers),
            jitter_eps=hf.take_float("router_jitter_noise", 0.0))  # training-only input jitter, same as HF
        return ModelConfig(
            vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.num_layers, max_seq_len=c.max_seq_len,
            dense_ffn_dim=F_, norm="rmsnorm", norm_eps=c.norm_eps,
            activation=c.activation, tie_embeddings=c.tie, init_std=c.init_std,
            attention=AttentionConfig(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                      rope_theta=c.rope_theta, sliding_window=window),
            moe=MoEConfig(num_experts=E, expert_ffn_dim=F_, router=router))

    def from_moelab(self, cfg: ModelConfig) -> dict:
        p = common_export_problems(cfg)
        if not p:
            a, m = cfg.attention, cfg.moe
            r = m.router
            p += moe_layer_problems(cfg)
            if cfg.norm != "rmsnorm":
                p.append("norm=layernorm")
            if r.type != "topk" or not (r.softmax_order == "topk_then_softmax" or r.norm_topk_prob) \
                    or r.topk_norm_p != 1.0:
                p.append("router other than softmax top-k with renormalised gates")
            if m.num_shared_experts:
                p.append("shared experts")
            if a.qkv_bias or a.out_bias or cfg.lm_head_bias:
                p.append("biases")
            if a.qk_norm != "none":
                p.append("q/k norm")
            if a.clip_qkv is not None:
                p.append("clip_qkv")
        if p:
            raise UnsupportedForFamily(self.model_type, p)
        return {**write_llama_common(cfg), "intermediate_size": cfg.moe.expert_ffn_dim,
                "num_local_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.router.top_k,
                "sliding_window": cfg.attention.sliding_window, "router_aux_loss_coef": lb_coef_to_hf(cfg),
                "router_jitter_noise": cfg.moe.router.jitter_eps}

    def global_rules(self, cfg: ModelConfig):
        return llama_global_rules()

    def layer_rules(self, cfg: ModelConfig):
        E = cfg.moe.num_experts
        return llama_attention_rules() + llama_norm_rules() + [
            copy(f"{MOE}.gate.weight", "blocks.{i}.ffn.router.weight"),
            stack(f"{MOE}.experts.{{e}}.w1.weight", "blocks.{i}.ffn.experts.gate_EFD", E),
            stack(f"{MOE}.experts.{{e}}.w3.weight", "blocks.{i}.ffn.experts.up_EFD", E),
            stack(f"{MOE}.experts.{{e}}.w2.weight", "blocks.{i}.ffn.experts.down_EDF", E),
        ]
