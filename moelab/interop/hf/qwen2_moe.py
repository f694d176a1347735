"""Qwen2-MoE / Qwen1.5-MoE (HF ``modeling_qwen2_moe``): RMSNorm, q/k/v bias (``qkv_bias``), softmax
-> top-k router with optional renormalisation (``norm_topk_prob``), one shared expert scaled by
sigmoid(x w) (``shared_expert_gate``), MoE every ``decoder_sparse_step``-th layer except
``mlp_only_layers`` (those use a dense SwiGLU of ``intermediate_size``).

HF checkpoint keys: model.layers.{i}.mlp.gate.weight (E, D), mlp.experts.{e}.{gate,up,down}_proj,
mlp.shared_expert.{gate,up,down}_proj, mlp.shared_expert_gate.weight (1, D); dense layers
mlp.{gate,up,down}_proj.
"""

from __future__ import annotations

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.interop.hf.common import (Adapter, UnsupportedForFamily, common_export_problems, lb_coef_from_hf,
                                      lb_coef_to_hf, llama_attention_rules, llama_global_rules, llama_norm_rules,
                                      norm_topk_prob_of, qwen_layer_pattern, qwen_layer_pattern_to_hf,
                                      qwen_style_moe_rules, read_llama_common, topk_router_problems,
                                      write_llama_common)
from moelab.interop.hf.config_reader import HFConfig


def sliding_window_of(hf: HFConfig, num_layers: int) -> int | None:
    """moelab has one window for all layers. HF Qwen2-MoE slides only on some layers
    (``layer_types``, or by default every other layer below ``max_window_layers``)."""
    use = hf.take_bool("use_sliding_window", False)
    window = hf.take("sliding_window", None)
    hf.take("max_window_layers", None)  # only read through the default layer_types below
    types = hf.take("layer_types", None)
    if types is None:
        types = ["full_attention"] * num_layers
        if use:
            raise hf.error("use_sliding_window", use, "HF slides only on every other layer below "
                           "max_window_layers; moelab has one window for all layers")
    if not isinstance(types, list) or len(types) != num_layers or set(types) - {"full_attention", "sliding_attention"}:
        raise hf.error("layer_types", types, "must list 'full_attention'/'sliding_attention' for every layer")
    if all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types) and use and isinstance(window, int) and window > 0:
        return window
    raise hf.error("layer_types", types, "moelab applies one sliding window to all layers or to none")


class Qwen2MoeAdapter(Adapter):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"

    def to_moelab(self, hf: HFConfig) -> ModelConfig:
        c = read_llama_common(hf, default_theta=10000.0, eps_default=1e-6)
        E = hf.take_int("num_experts", 60, "num_local_experts", minimum=0)
        K = hf.take_int("num_experts_per_tok", 4)
        pattern = qwen_layer_pattern(hf, c.num_layers, E)
        bias = hf.take_bool("qkv_bias", True)
        window = sliding_window_of(hf, c.num_layers)
        moe = None
        F_ = hf.take_int("moe_intermediate_size", 1408)
        shared_F = hf.take_int("shared_expert_intermediate_size", 5632)
        norm_topk = hf.take_bool("norm_topk_prob", False)
        aux = hf.take_float("router_aux_loss_coef", 0.001)
        if pattern["any_moe"]:
            moe = MoEConfig(
                num_experts=E, expert_ffn_dim=F_, num_shared_experts=1, shared_expert_ffn_dim=shared_F,
                shared_expert_gate=True, moe_every=pattern["moe_every"], dense_layers=pattern["dense_layers"],
                router=RouterConfig(type="topk", top_k=K, softmax_order="softmax_then_topk", norm_topk_prob=norm_topk,
                                    load_balance_coef=lb_coef_from_hf(aux, K, pattern["num_moe_layers"])))
        return ModelConfig(
            vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.num_layers, max_seq_len=c.max_seq_len,
            dense_ffn_dim=hf.take_int("intermediate_size", 5632), norm="rmsnorm", norm_eps=c.norm_eps,
            activation=c.activation, tie_embeddings=c.tie, init_std=c.init_std,
            attention=AttentionConfig(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                      rope_theta=c.rope_theta, sliding_window=window, qkv_bias=bias),
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
            if m.num_shared_experts == 0 or not m.shared_expert_gate:
                p.append("no sigmoid-gated shared expert (Qwen2-MoE always has one)")
            if a.out_bias or cfg.lm_head_bias:
                p.append("output-projection or LM-head bias")
            if a.qk_norm != "none":
                p.append("q/k norm")
            if a.clip_qkv is not None:
                p.append("clip_qkv")
        if p:
            raise UnsupportedForFamily(self.model_type, p)
        m, L = cfg.moe, cfg.num_layers
        window = cfg.attention.sliding_window
        return {**write_llama_common(cfg), **pattern, "intermediate_size": cfg.dense_ffn_dim,
                "moe_intermediate_size": m.expert_ffn_dim, "shared_expert_intermediate_size": m.shared_ffn_dim,
                "num_experts": m.num_experts, "num_experts_per_tok": m.router.top_k,
                "norm_topk_prob": norm_topk_prob_of(cfg), "qkv_bias": cfg.attention.qkv_bias,
                "use_sliding_window": window is not None, "sliding_window": window, "max_window_layers": L,
                "layer_types": ["sliding_attention" if window else "full_attention"] * L,
                "router_aux_loss_coef": lb_coef_to_hf(cfg)}

    def global_rules(self, cfg: ModelConfig):
        return llama_global_rules()

    def layer_rules(self, cfg: ModelConfig):
        E = cfg.moe.num_experts if cfg.moe else 0
        return llama_attention_rules() + llama_norm_rules() + qwen_style_moe_rules(E)
