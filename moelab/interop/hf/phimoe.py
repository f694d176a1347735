"""PhiMoE / Phi-3.5-MoE (HF ``modeling_phimoe``): LayerNorm with bias (eps from ``rms_norm_eps``),
optional biases on q/k/v/o (``attention_bias``) and the LM head (``lm_head_bias``), every layer an
MoE routed by SparseMixer (moelab router ``sparsemixer``; HF always picks exactly 2 experts), and
LongRoPE (``rope_scaling`` / ``rope_parameters`` of type ``longrope``, every published checkpoint) as
HF runs it: short factors at every length, long_mscale past original_max_position_embeddings (see the
NOTE in ``moelab/layers/rope.py``).

Field meanings that differ from Mixtral: ``router_jitter_noise`` is SparseMixer's mask threshold
eps (it changes eval-mode routing), ``input_jitter_noise`` is the training-only input jitter.

HF checkpoint keys: as Mixtral (``block_sparse_moe.gate`` / ``experts.{e}.w1|w2|w3``), plus biases.
"""

from __future__ import annotations

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.interop.hf.common import (Adapter, UnsupportedForFamily, common_export_problems, copy, lb_coef_from_hf,
                                      lb_coef_to_hf, llama_attention_rules, llama_global_rules, llama_norm_rules,
                                      moe_layer_problems, read_llama_common, stack, write_llama_common)
from moelab.interop.hf.config_reader import HFConfig

MOE = "model.layers.{i}.block_sparse_moe"


class PhimoeAdapter(Adapter):
    model_type = "phimoe"
    architecture = "PhimoeForCausalLM"

    def to_moelab(self, hf: HFConfig) -> ModelConfig:
        c = read_llama_common(hf, default_theta=1e6, eps_default=1e-5, scaled_rope=("longrope",))
        E = hf.take_int("num_local_experts", 16, "num_experts")
        F_ = hf.take_int("intermediate_size", 6400)  # the expert width (no dense layers)
        K = hf.take_int("num_experts_per_tok", 2)
        if K != 2:
            raise hf.error("num_experts_per_tok", K, "PhiMoE's SparseMixer routing always picks exactly 2 experts "
                           "(HF ignores other values); set it to 2")
        window = hf.take("sliding_window", None)
        if window is not None:
            window = hf.take_int("sliding_window")
        bias = hf.take_bool("attention_bias", False)
        # Hub-only field HF's PhimoeConfig does not read: hidden_dropout (training-only dropout).
        hf.ignore("hidden_dropout")
        router = RouterConfig(
            type="sparsemixer", top_k=2,
            sparsemixer_eps=hf.take_float("router_jitter_noise", 0.01),
            jitter_eps=hf.take_float("input_jitter_noise", 0.0),  # training-only, as in HF
            load_balance_coef=lb_coef_from_hf(hf.take_float("router_aux_loss_coef", 0.001), 2, c.num_layers))
        return ModelConfig(
            vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.num_layers, max_seq_len=c.max_seq_len,
            dense_ffn_dim=F_, norm="layernorm", norm_bias=True, norm_eps=c.norm_eps,
            activation=c.activation, tie_embeddings=c.tie, init_std=c.init_std,
            lm_head_bias=hf.take_bool("lm_head_bias", False),
            attention=AttentionConfig(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                      rope_theta=c.rope_theta, sliding_window=window, qkv_bias=bias, out_bias=bias,
                                      **c.rope_scaling),
            moe=MoEConfig(num_experts=E, expert_ffn_dim=F_, router=router))

    def from_moelab(self, cfg: ModelConfig) -> dict:
        p = common_export_problems(cfg, rope_types=("default", "longrope"))
        if not p:
            a, m = cfg.attention, cfg.moe
            p += moe_layer_problems(cfg)
            if cfg.norm != "layernorm" or not cfg.norm_bias:
                p.append("a norm other than LayerNorm with bias")
            if m.router.type != "sparsemixer" or m.router.top_k != 2:
                p.append("a router other than sparsemixer top-2")
            if m.num_shared_experts:
                p.append("shared experts")
            if a.qkv_bias != a.out_bias:
                p.append("q/k/v bias without the output bias (or the reverse)")
            if a.qk_norm != "none":
                p.append("q/k norm")
            if a.clip_qkv is not None:
                p.append("clip_qkv")
        if p:
            raise UnsupportedForFamily(self.model_type, p)
        r = cfg.moe.router
        return {**write_llama_common(cfg), "intermediate_size": cfg.moe.expert_ffn_dim,
                "num_local_experts": cfg.moe.num_experts, "num_experts_per_tok": 2,
                "sliding_window": cfg.attention.sliding_window, "attention_bias": cfg.attention.qkv_bias,
                "lm_head_bias": cfg.lm_head_bias, "router_jitter_noise": r.sparsemixer_eps,
                "input_jitter_noise": r.jitter_eps, "router_aux_loss_coef": lb_coef_to_hf(cfg)}

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
