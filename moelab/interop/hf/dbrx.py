"""DBRX (HF ``modeling_dbrx``): LayerNorm without bias (eps 1e-5, fixed), fused q/k/v projection
``Wqkv`` clamped to [-clip_qkv, clip_qkv], every layer an MoE routed by softmax -> top-k, gates
divided by their p-norm (``moe_normalize_expert_weights`` = p, moelab's ``norm_topk_prob`` with
``topk_norm_p`` = p; null: not normalised).

Expert weights are stored as three (E*F, D) matrices per layer: w1 (gate) and v1 (up) are rows
e*F..(e+1)*F of expert e, and w2 holds the *transposed* down projection (expert e computes
h @ w2_e with w2_e of shape (F, D)).

HF checkpoint keys (layer i):
  transformer.blocks.{i}.norm_attn_norm.norm_1.weight          -> blocks.{i}.attn_norm.weight
  transformer.blocks.{i}.norm_attn_norm.attn.Wqkv.weight       -> blocks.{i}.attn.{q,k,v}_proj.weight (split rows)
  transformer.blocks.{i}.norm_attn_norm.attn.out_proj.weight   -> blocks.{i}.attn.o_proj.weight
  transformer.blocks.{i}.norm_attn_norm.norm_2.weight          -> blocks.{i}.ffn_norm.weight
  transformer.blocks.{i}.ffn.router.layer.weight (E, D)        -> blocks.{i}.ffn.router.weight
  transformer.blocks.{i}.ffn.experts.mlp.w1 / v1 (E*F, D)      -> blocks.{i}.ffn.experts.gate_EFD / up_EFD
  transformer.blocks.{i}.ffn.experts.mlp.w2 (E*F, D)           -> blocks.{i}.ffn.experts.down_EDF (transposed)
"""

from __future__ import annotations

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.interop.hf.common import (Adapter, UnsupportedForFamily, activation_from_hf, activation_to_hf,
                                      common_export_problems, copy, lb_coef_from_hf, lb_coef_to_hf,
                                      moe_layer_problems, norm_topk_prob_of, rope_theta_from_hf, rows_to_stacked,
                                      same_float, split_rows, topk_router_problems)
from moelab.interop.hf.config_reader import HFConfig

LAYERNORM_EPS = 1e-5  # nn.LayerNorm default; DBRX has no config field for it
BLOCK = "transformer.blocks.{i}"


class DbrxAdapter(Adapter):
    model_type = "dbrx"
    architecture = "DbrxForCausalLM"

    def to_moelab(self, hf: HFConfig) -> ModelConfig:
        attn = HFConfig(hf.take("attn_config", {}), f"{hf.where} attn_config", hf.counting_only)
        ffn = HFConfig(hf.take("ffn_config", {}), f"{hf.where} ffn_config", hf.counting_only)
        attn.model_type = ffn.model_type = "dbrx"
        d, heads, L = hf.take_int("d_model", 2048), hf.take_int("n_heads", 16), hf.take_int("n_layers", 24)
        # transformers >= 5 reads RoPE from top-level rope_parameters; hub files keep it in attn_config.
        # NOTE: transformers 5.x ignores attn_config.rope_theta when rope_parameters is absent (it then runs
        # theta 10000); moelab follows the checkpoint's stated theta (5e5 for DBRX).
        legacy_theta = attn.take("rope_theta", None)
        theta = rope_theta_from_hf(hf, default=float(legacy_theta) if legacy_theta is not None else 10000.0)
        if hf.take_bool("tie_word_embeddings", False):
            raise hf.error("tie_word_embeddings", True, "DBRX does not tie embeddings (HF refuses it too)")
        # Training-only dropouts (HF applies them only in training; moelab has no dropout):
        hf.take_float("resid_pdrop", 0.0), hf.take_float("emb_pdrop", 0.0), attn.take_float("attn_pdrop", 0.0)
        # Hub-only duplicate of ffn_config.moe_loss_weight that HF's DbrxConfig does not read.
        hf.ignore("router_aux_loss_coef")
        clip = attn.take("clip_qkv", None)
        if clip is not None:
            clip = attn.take_float("clip_qkv", minimum=0.0, allow_equal=False)
        kv = attn.take_int("kv_n_heads", 1)
        mirror = hf.take("num_key_value_heads", kv)  # transformers >= 5 writes a copy of kv_n_heads here
        if mirror != kv:
            raise hf.error("num_key_value_heads", mirror, f"must equal attn_config.kv_n_heads={kv}")
        act = ffn.take("ffn_act_fn", {"name": "silu"})
        if not isinstance(act, dict) or set(act) - {"name"}:
            raise ffn.error("ffn_act_fn", act, "only {'name': <activation>} is supported (no extra arguments)")
        activation = activation_from_hf(ffn, "ffn_act_fn", act.get("name", "silu"))
        E, K = ffn.take_int("moe_num_experts", 4), ffn.take_int("moe_top_k", 1)
        # An explicit null means "no normalisation" (not the 1.0 default), so read it raw.
        p = ffn.data.get("moe_normalize_expert_weights", 1.0)
        ffn.ignore("moe_normalize_expert_weights")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0):
            raise ffn.error("moe_normalize_expert_weights", p, "must be a positive number p (the gates are divided "
                            "by their p-norm) or null (no normalisation)")
        ffn.ignore("hidden_size")  # HF overwrites it with d_model
        jitter = ffn.take("moe_jitter_eps", None)
        router = RouterConfig(
            type="topk", top_k=K, softmax_order="softmax_then_topk", norm_topk_prob=p is not None,
            topk_norm_p=1.0 if p is None else float(p),
            jitter_eps=0.0 if jitter is None else ffn.take_float("moe_jitter_eps"),  # training-only, as in HF
            load_balance_coef=lb_coef_from_hf(ffn.take_float("moe_loss_weight", 0.01), K, L))
        F_ = ffn.take_int("ffn_hidden_size", 3584)
        attn.finish()
        ffn.finish()
        return ModelConfig(
            vocab_size=hf.take_int("vocab_size", 32000), d_model=d, num_layers=L,
            max_seq_len=hf.take_int("max_seq_len", 2048, "max_position_embeddings"), dense_ffn_dim=F_,
            norm="layernorm", norm_bias=False, norm_eps=LAYERNORM_EPS, activation=activation,
            init_std=hf.take_float("initializer_range", 0.02, minimum=0.0, allow_equal=False),
            attention=AttentionConfig(num_heads=heads, num_kv_heads=kv, rope_theta=theta, clip_qkv=clip),
            moe=MoEConfig(num_experts=E, expert_ffn_dim=F_, router=router))

    def from_moelab(self, cfg: ModelConfig) -> dict:
        p = common_export_problems(cfg)
        if not p:
            a, m = cfg.attention, cfg.moe
            p += topk_router_problems(cfg, any_norm_p=True) + moe_layer_problems(cfg)
            if cfg.norm != "layernorm" or cfg.norm_bias or not same_float(cfg.norm_eps, LAYERNORM_EPS):
                p.append("a norm other than LayerNorm without bias, eps 1e-5")
            if m.num_shared_experts:
                p.append("shared experts")
            if a.qkv_bias or a.out_bias or cfg.lm_head_bias:
                p.append("biases")
            if a.qk_norm != "none":
                p.append("q/k norm")
            if a.sliding_window is not None:
                p.append("sliding_window")
            if a.head_dim is not None and a.head_dim * a.num_heads != cfg.d_model:
                p.append("head_dim != d_model / num_heads")
            if cfg.tie_embeddings:
                p.append("tie_embeddings")
        if p:
            raise UnsupportedForFamily(self.model_type, p)
        a, m = cfg.attention, cfg.moe
        return {
            "d_model": cfg.d_model, "n_heads": a.num_heads, "n_layers": cfg.num_layers, "max_seq_len": cfg.max_seq_len,
            "vocab_size": cfg.vocab_size, "resid_pdrop": 0.0, "emb_pdrop": 0.0, "initializer_range": cfg.init_std,
            "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
            "attn_config": {"attn_pdrop": 0.0, "clip_qkv": a.clip_qkv, "kv_n_heads": a.kv_heads,
                            "rope_theta": a.rope_theta},
            "ffn_config": {"ffn_act_fn": {"name": activation_to_hf(cfg)}, "ffn_hidden_size": m.expert_ffn_dim,
                           "moe_num_experts": m.num_experts, "moe_top_k": m.router.top_k,
                           "moe_jitter_eps": m.router.jitter_eps or None, "moe_loss_weight": lb_coef_to_hf(cfg),
                           "moe_normalize_expert_weights": (m.router.topk_norm_p if norm_topk_prob_of(cfg)
                                                            else None)},
        }

    def global_rules(self, cfg: ModelConfig):
        return [copy("transformer.wte.weight", "embed.weight"), copy("transformer.norm_f.weight", "norm.weight"),
                copy("lm_head.weight", "lm_head.weight")]

    def layer_rules(self, cfg: ModelConfig):
        na = f"{BLOCK}.norm_attn_norm"
        ex = f"{BLOCK}.ffn.experts.mlp"
        return [
            copy(f"{na}.norm_1.weight", "blocks.{i}.attn_norm.weight"),
            split_rows(f"{na}.attn.Wqkv.weight", ("blocks.{i}.attn.q_proj.weight", "blocks.{i}.attn.k_proj.weight",
                                                  "blocks.{i}.attn.v_proj.weight")),
            copy(f"{na}.attn.out_proj.weight", "blocks.{i}.attn.o_proj.weight"),
            copy(f"{na}.norm_2.weight", "blocks.{i}.ffn_norm.weight"),
            copy(f"{BLOCK}.ffn.router.layer.weight", "blocks.{i}.ffn.router.weight"),
            rows_to_stacked(f"{ex}.w1", "blocks.{i}.ffn.experts.gate_EFD"),
            rows_to_stacked(f"{ex}.v1", "blocks.{i}.ffn.experts.up_EFD"),
            rows_to_stacked(f"{ex}.w2", "blocks.{i}.ffn.experts.down_EDF", transpose=True),
        ]
