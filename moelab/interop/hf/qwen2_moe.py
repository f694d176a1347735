"""Qwen2-MoE / Qwen1.5-MoE (HF ``modeling_qwen2_moe``): RMSNorm, q/k/v bias (``qkv_bias``), softmax
-> top-k router with optional renormalisation (``norm_topk_prob``), one shared expert scaled by
sigmoid(x w) (``shared_expert_gate``), MoE every ``decoder_sparse_step``-th layer except
``mlp_only_layers`` (those use a dense SwiGLU of ``intermediate_size``), a sliding window on the layers
``layer_types`` marks (by default the even layers below ``max_window_layers``; moelab
``attention.window_layers``).

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


LAYER_TYPES = ("full_attention", "sliding_attention")


def default_layer_types(num_layers: int, max_window_layers: int, use_sliding_window: bool) -> list[str]:
    """transformers 5's Qwen2MoeConfig default when config.json has no ``layer_types``: the even layers
    0, 2, 4 ... below ``max_window_layers`` slide, and only with ``use_sliding_window``."""
    return ["sliding_attention" if use_sliding_window and i % 2 == 0 and i < max_window_layers else "full_attention"
            for i in range(num_layers)]


def sliding_windows_of(hf: HFConfig, num_layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """(attention.sliding_window, attention.window_layers) as transformers 5 builds Qwen2-MoE: the layers
    marked ``sliding_attention`` in ``layer_types`` (or its default) get a causal mask of width
    ``sliding_window`` in every attention path (eager, sdpa), the others attend fully."""
    use = hf.take_bool("use_sliding_window", False)
    window = hf.take("sliding_window", None)  # HF sets it to 0 unless use_sliding_window
    max_layers = hf.take("max_window_layers", 28)  # read only through the default layer_types
    types = hf.take("layer_types", None)
    if types is None:
        if isinstance(max_layers, bool) or not isinstance(max_layers, int):
            raise hf.error("max_window_layers", max_layers, "must be an integer")
        types = default_layer_types(num_layers, max_layers, use)
    if isinstance(types, list):
        types = ["full_attention" if t == "attention" else t for t in types]  # HF's legacy name
    if not isinstance(types, list) or len(types) != num_layers or set(types) - set(LAYER_TYPES):
        raise hf.error("layer_types", types, f"must list 'full_attention' or 'sliding_attention' for each of the "
                       f"{num_layers} layers")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if not sliding:
        return None, None
    if not use:
        raise hf.error("layer_types", types, "marks sliding layers but use_sliding_window is false, so "
                       "transformers gives them a window of 0 (no key visible); set use_sliding_window: true or "
                       "make those layers full_attention")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise hf.error("sliding_window", window, "must be an integer >= 1 when some layers slide")
    return window, None if len(sliding) == num_layers else sliding


def layer_types_to_hf(cfg: ModelConfig) -> dict:
    """use_sliding_window, sliding_window, max_window_layers and layer_types for ``cfg``'s pattern. The
    explicit layer_types is what transformers reads; max_window_layers is the smallest value whose
    default gives the same pattern (else num_layers), so that a reader of the older fields agrees."""
    L = cfg.num_layers
    types = ["full_attention" if cfg.layer_window(i) is None else "sliding_attention" for i in range(L)]
    use = "sliding_attention" in types
    max_layers = next((m for m in range(L + 1) if default_layer_types(L, m, True) == types), L) if use else L
    return {"use_sliding_window": use, "sliding_window": cfg.attention.sliding_window if use else None,
            "max_window_layers": max_layers, "layer_types": types}


class Qwen2MoeAdapter(Adapter):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"

    def to_moelab(self, hf: HFConfig) -> ModelConfig:
        c = read_llama_common(hf, default_theta=10000.0, eps_default=1e-6)
        E = hf.take_int("num_experts", 60, "num_local_experts", minimum=0)
        K = hf.take_int("num_experts_per_tok", 4)
        pattern = qwen_layer_pattern(hf, c.num_layers, E)
        bias = hf.take_bool("qkv_bias", True)
        window, window_layers = sliding_windows_of(hf, c.num_layers)
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
                                      rope_theta=c.rope_theta, sliding_window=window, window_layers=window_layers,
                                      qkv_bias=bias),
            moe=moe)

    def from_moelab(self, cfg: ModelConfig) -> dict:
        p = common_export_problems(cfg, window_pattern=True)
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
        m = cfg.moe
        return {**write_llama_common(cfg), **pattern, **layer_types_to_hf(cfg),
                "intermediate_size": cfg.dense_ffn_dim, "moe_intermediate_size": m.expert_ffn_dim,
                "shared_expert_intermediate_size": m.shared_ffn_dim,
                "num_experts": m.num_experts, "num_experts_per_tok": m.router.top_k,
                "norm_topk_prob": norm_topk_prob_of(cfg), "qkv_bias": cfg.attention.qkv_bias,
                "router_aux_loss_coef": lb_coef_to_hf(cfg)}

    def global_rules(self, cfg: ModelConfig):
        return llama_global_rules()

    def layer_rules(self, cfg: ModelConfig):
        E = cfg.moe.num_experts if cfg.moe else 0
        return llama_attention_rules() + llama_norm_rules() + qwen_style_moe_rules(E)
