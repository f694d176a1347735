"""DeepSeek-V2 / V2-Lite and DeepSeek-V3 (HF ``modeling_deepseek_v2`` / ``modeling_deepseek_v3``): RMSNorm,
multi-head latent attention (REFERENCES §5) with plain or YaRN RoPE, the first ``first_k_dense_replace``
layers dense, then MoE layers of fine-grained routed experts plus ``n_shared_experts`` shared experts run
as one SwiGLU of width n_shared_experts * moe_intermediate_size (no gate). The two families differ in
their router (§4.2, §4.3) and in what else config.json may say: V3 has ``rope_interleave`` and MTP
layers (``num_nextn_predict_layers``); V2's RoPE is always interleaved.

HF checkpoint keys (layer i, expert e):
  model.layers.{i}.self_attn.q_a_proj / q_a_layernorm / q_b_proj (q_proj without a query latent)
                                                        -> blocks.{i}.attn.q_a_proj / q_a_norm / q_b_proj (q_proj)
  model.layers.{i}.self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj / o_proj
                                                        -> blocks.{i}.attn.kv_a_proj / kv_a_norm / kv_b_proj / o_proj
  model.layers.{i}.mlp.gate.weight (E, D)               -> blocks.{i}.ffn.router.weight
  model.layers.{i}.mlp.gate.e_score_correction_bias (E) -> blocks.{i}.ffn.router.e_score_correction_bias (V3)
  model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj  -> blocks.{i}.ffn.experts.{gate_EFD,up_EFD,down_EDF}[e]
  model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj -> blocks.{i}.ffn.shared.*
  model.layers.{i}.mlp.{gate,up,down}_proj (dense layers) -> blocks.{i}.ffn.*
V3 MTP module k sits at layer L + k (L = num_hidden_layers), as in the released checkpoint:
  model.layers.{L+k}.{enorm,hnorm,eh_proj,shared_head.norm} -> mtp.{k}.{enorm,hnorm,eh_proj,norm}, its decoder-layer
  keys as above -> mtp.{k}.block.*, and copies of the embedding and the head (embed_tokens, shared_head.head) that
  moelab shares with the main model (load checks they are equal). moelab loads them when the checkpoint has them.
  DeepseekV3ForCausalLM ignores these keys; transformers' MtpModel (modeling_layers.py, generate(use_mtp=True))
  reads them as MtpLayer k (shared_head.norm -> post_norm, the decoder layer -> mtp_block) and computes what
  moelab's MTPModule does: depth 1 is fed the main model's output after the final norm, depth k + 1 depth k's
  output after its shared_head.norm. NOTE: MtpModel.from_pretrained looks for model.layers.61.* only
  (DeepseekV3PreTrainedModel._keys_to_ignore_on_load_unexpected, the released model's layer count).
"""

from __future__ import annotations

import dataclasses
import warnings

from moelab.config import AttentionConfig, MLAConfig, ModelConfig, MoEConfig, MTPConfig, RouterConfig
from moelab.interop.hf.common import (Adapter, Rule, UnsupportedForFamily, common_export_problems, copy, duplicate,
                                      llama_dense_mlp_rules, llama_global_rules, llama_norm_rules, read_llama_common,
                                      same_float, stack, write_llama_common)
from moelab.interop.hf.config_reader import HFConfig
from moelab.moe.routers.deepseek import group_score_width

ATTN = "model.layers.{i}.self_attn"
MLP = "model.layers.{i}.mlp"
# The latent RMSNorms (q_a_layernorm, kv_a_layernorm): HF builds them with the default eps, no config field.
LATENT_NORM_EPS = 1e-6
# HF name -> moelab name of the MLA projections and norms under self_attn / attn.
MLA_MODULES = (("q_a_proj", "q_a_proj"), ("q_a_layernorm", "q_a_norm"), ("q_b_proj", "q_b_proj"), ("q_proj", "q_proj"),
               ("kv_a_proj_with_mqa", "kv_a_proj"), ("kv_a_layernorm", "kv_a_norm"), ("kv_b_proj", "kv_b_proj"),
               ("o_proj", "o_proj"))


class _DeepSeekAdapter(Adapter):
    """What V2 and V3 share; the subclasses hold their router, RoPE layout and MTP."""

    defaults: dict = {}  # the HF config class defaults that differ between the two families
    export_routers: tuple[str, ...] = ()  # moelab router types the family's router reproduces
    has_mtp = False  # whether config.json can name MTP layers

    # ---- config.json -> moelab ---------------------------------------------------------------------
    def to_moelab(self, hf: HFConfig) -> ModelConfig:
        d = self.defaults
        self._refuse_quantized(hf)
        # transformers sets head_dim = qk_rope_head_dim and qk_head_dim = nope + rope (its RoPE and attention
        # read them); saved config.json files carry both. read_llama_common takes head_dim, so check it first.
        head_dim, qk_head_dim = hf.data.get("head_dim"), hf.take("qk_head_dim", None)
        c = read_llama_common(hf, default_theta=10000.0, eps_default=1e-6, scaled_rope=("yarn",))
        if c.num_kv_heads != c.num_heads:
            raise hf.error("num_key_value_heads", c.num_kv_heads, f"MLA has one key and value per head: must equal "
                           f"num_attention_heads={c.num_heads}")
        # An explicit null means a full-rank q_proj (V2-Lite), not the 1536 default, so read it raw. 0 would
        # build empty projections in HF and is an error.
        q_lora = hf.data.get("q_lora_rank", 1536)
        hf.ignore("q_lora_rank")
        if q_lora is not None:
            q_lora = hf.take_int("q_lora_rank")
        mla = MLAConfig(kv_lora_rank=hf.take_int("kv_lora_rank", 512), q_lora_rank=q_lora,
                        qk_nope_head_dim=hf.take_int("qk_nope_head_dim", 128, minimum=0),
                        qk_rope_head_dim=hf.take_int("qk_rope_head_dim", 64), v_head_dim=hf.take_int("v_head_dim", 128),
                        rope_interleave=self._rope_interleave(hf), latent_norm_eps=LATENT_NORM_EPS)
        if head_dim is not None and head_dim != mla.qk_rope_head_dim:
            raise hf.error("head_dim", head_dim, f"transformers sets it to qk_rope_head_dim={mla.qk_rope_head_dim}")
        if qk_head_dim is not None and qk_head_dim != mla.qk_head_dim:
            raise hf.error("qk_head_dim", qk_head_dim,
                           f"must be qk_nope_head_dim + qk_rope_head_dim = {mla.qk_head_dim}")
        bias = hf.take_bool("attention_bias", False)  # q_a_proj, kv_a_proj_with_mqa and o_proj alike
        if hf.take_bool("mlp_bias", False):
            raise hf.error("mlp_bias", True, "moelab's dense and shared MLPs have no biases")
        # Parallelism hints that do not change the function: transformers 5 ignores pretraining_tp, and ep_size
        # is the expert-parallel degree of DeepSeek's own inference code.
        hf.ignore("pretraining_tp", "ep_size")

        L = c.num_layers
        E = hf.data.get("n_routed_experts", d["n_routed_experts"])  # null: a dense model (DeepSeek's code)
        hf.ignore("n_routed_experts")
        if E is not None:
            E = hf.take_int("n_routed_experts")
        K = hf.take_int("num_experts_per_tok", d["num_experts_per_tok"])
        first_k = hf.take_int("first_k_dense_replace", d["first_k_dense_replace"], minimum=0)
        # NOTE: DeepSeek's own code puts an MoE layer at i >= first_k_dense_replace with i % moe_layer_freq == 0;
        # transformers ignores moe_layer_freq (MoE at every i >= first_k_dense_replace). moelab follows DeepSeek's
        # code here; export refuses any pattern transformers would build differently.
        freq = hf.take_int("moe_layer_freq", 1)
        n_moe = sum(i >= first_k and i % freq == 0 for i in range(L))
        shared = hf.take_int("n_shared_experts", d["n_shared_experts"], minimum=0)
        F_ = hf.take_int("moe_intermediate_size", d["moe_intermediate_size"])
        router = self._router(hf, K)
        moe = None
        if E is not None and n_moe:
            if shared == 0:
                raise hf.error("n_shared_experts", 0, "transformers builds a zero-width shared MLP; moelab needs >= 1")
            moe = MoEConfig(num_experts=E, expert_ffn_dim=F_, num_shared_experts=shared, first_k_dense=first_k,
                            moe_every=freq, moe_offset=0, router=router)
        return ModelConfig(
            vocab_size=c.vocab_size, d_model=c.d_model, num_layers=L, max_seq_len=c.max_seq_len,
            dense_ffn_dim=hf.take_int("intermediate_size", d["intermediate_size"]), norm="rmsnorm",
            norm_eps=c.norm_eps, activation=c.activation, tie_embeddings=c.tie, init_std=c.init_std,
            attention=AttentionConfig(num_heads=c.num_heads, rope_theta=c.rope_theta, qkv_bias=bias, out_bias=bias,
                                      mla=mla, **c.rope_scaling),
            moe=moe, mtp=self._mtp(hf))

    @staticmethod
    def _refuse_quantized(hf: HFConfig) -> None:
        q = hf.take("quantization_config", None)
        if q is not None and not hf.counting_only:  # parameter shapes are those of the unquantised model
            method = q.get("quant_method") if isinstance(q, dict) else q
            raise hf.error("quantization_config", method, "moelab loads unquantised (bf16 / fp16 / fp32) weights "
                           "only; dequantise the checkpoint first (DeepSeek-V3's FP8 blocks: "
                           "inference/fp8_cast_bf16.py in deepseek-ai/DeepSeek-V3) and drop this field")

    def _router(self, hf: HFConfig, top_k: int) -> RouterConfig:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rope_interleave(self, hf: HFConfig) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _mtp(self, hf: HFConfig) -> MTPConfig | None:
        return None

    @staticmethod
    def _choice(hf: HFConfig, name: str, default: str, allowed: tuple[str, ...], why: str) -> str:
        value = hf.take(name, default)
        if value not in allowed:
            raise hf.error(name, value, f"{why}; supported: {', '.join(allowed)}")
        return value

    # ---- moelab -> config.json ---------------------------------------------------------------------
    def from_moelab(self, cfg: ModelConfig) -> dict:
        p = common_export_problems(cfg, rope_types=("default", "yarn"), routers=self.export_routers, mla=True,
                                   mtp=self.has_mtp, scaled_gates=True)
        if not p and cfg.attention.mla is None:
            p.append("standard attention (the DeepSeek families use multi-head latent attention, attention.mla)")
        if not p:
            p += self._shared_problems(cfg) + self._router_problems(cfg)
        if p:
            raise UnsupportedForFamily(self.model_type, p)
        a, m, mla = cfg.attention, cfg.moe, cfg.attention.mla
        fields = write_llama_common(cfg)
        del fields["head_dim"]  # transformers derives it (qk_rope_head_dim); MLA has no attention.head_dim
        return {**fields, "intermediate_size": cfg.dense_ffn_dim, "attention_bias": a.qkv_bias,
                "q_lora_rank": mla.q_lora_rank, "kv_lora_rank": mla.kv_lora_rank,
                "qk_nope_head_dim": mla.qk_nope_head_dim, "qk_rope_head_dim": mla.qk_rope_head_dim,
                "v_head_dim": mla.v_head_dim, "n_routed_experts": m.num_experts,
                "n_shared_experts": m.shared_ffn_dim // m.expert_ffn_dim, "moe_intermediate_size": m.expert_ffn_dim,
                "num_experts_per_tok": m.router.top_k, "first_k_dense_replace": _first_moe_layer(cfg),
                "moe_layer_freq": 1, **self._router_to_hf(cfg), **self._extra_to_hf(cfg)}

    def _shared_problems(self, cfg: ModelConfig) -> list[str]:
        a, m, mla = cfg.attention, cfg.moe, cfg.attention.mla
        p = []
        if cfg.norm != "rmsnorm":
            p.append("norm=layernorm")
        if not same_float(mla.latent_norm_eps, LATENT_NORM_EPS):
            p.append(f"attention.mla.latent_norm_eps other than {LATENT_NORM_EPS:g} (HF has no field for it)")
        if a.qkv_bias != a.out_bias:
            p.append("qkv_bias != out_bias (HF attention_bias sets both)")
        if cfg.lm_head_bias:
            p.append("an LM-head bias")
        if m.num_shared_experts == 0 or m.shared_expert_gate or m.shared_ffn_dim % m.expert_ffn_dim:
            p.append("shared experts other than ungated ones of total width n * expert_ffn_dim "
                     "(HF: n_shared_experts * moe_intermediate_size)")
        first = _first_moe_layer(cfg)
        depth = cfg.num_layers + (cfg.mtp.num_modules if cfg.mtp is not None else 0)
        if any(cfg.is_moe_layer(i) != (i >= first) for i in range(depth)):
            p.append("a layer pattern other than the first k layers dense and MoE after (transformers builds an MoE "
                     "layer at every index >= first_k_dense_replace, MTP layers included)")
        return p

    def _router_problems(self, cfg: ModelConfig) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _router_to_hf(self, cfg: ModelConfig) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_to_hf(self, cfg: ModelConfig) -> dict:
        return {}

    # ---- keys -------------------------------------------------------------------------------------
    def global_rules(self, cfg: ModelConfig) -> list[Rule]:
        return llama_global_rules()

    def layer_rules(self, cfg: ModelConfig) -> list[Rule]:
        E = cfg.moe.num_experts if cfg.moe else 0
        rules = [copy(f"{ATTN}.{h}.{leaf}", f"blocks.{{i}}.attn.{ml}.{leaf}")
                 for h, ml in MLA_MODULES for leaf in ("weight", "bias")]
        rules += [copy(f"{MLP}.gate.weight", "blocks.{i}.ffn.router.weight"),
                  copy(f"{MLP}.gate.e_score_correction_bias", "blocks.{i}.ffn.router.e_score_correction_bias")]
        for hf_name, ml in (("gate_proj", "gate_EFD"), ("up_proj", "up_EFD"), ("down_proj", "down_EDF")):
            rules.append(stack(f"{MLP}.experts.{{e}}.{hf_name}.weight", f"blocks.{{i}}.ffn.experts.{ml}", E))
        rules += [copy(f"{MLP}.shared_experts.{p}.weight", f"blocks.{{i}}.ffn.shared.{p}.weight")
                  for p in ("gate_proj", "up_proj", "down_proj")]
        return rules + llama_dense_mlp_rules(MLP) + llama_norm_rules()


def _first_moe_layer(cfg: ModelConfig) -> int:
    return next((i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)), cfg.num_layers)


def _balance_loss(hf: HFConfig) -> tuple[float | None, bool | None]:
    """The hub-only ``aux_loss_alpha`` / ``seq_aux`` of DeepSeek's training code (transformers reads
    neither): training-only, they never change logits. None: moelab's family default."""
    alpha = hf.take("aux_loss_alpha", None)
    seq = hf.take("seq_aux", None)
    return (None if alpha is None else hf.take_float("aux_loss_alpha"),
            None if seq is None else hf.take_bool("seq_aux"))


class DeepseekV2Adapter(_DeepSeekAdapter):
    """DeepSeek-V2 routing (§4.2): softmax over all experts, ``topk_method`` "greedy" (top-K) or
    "group_limited_greedy" (the ``topk_group`` of ``n_group`` groups with the highest max affinity, masked
    with 0.0 in transformers, which equals moelab's -inf since softmax scores are > 0), gates x
    ``routed_scaling_factor``."""

    model_type = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    export_routers = ("deepseek_v2", "topk")
    defaults = dict(n_routed_experts=64, num_experts_per_tok=None, first_k_dense_replace=0, n_shared_experts=2,
                    moe_intermediate_size=1407, intermediate_size=11008)

    def _rope_interleave(self, hf: HFConfig) -> bool:
        # transformers' DeepSeek-V2 always rotates interleaved pairs (complex RoPE); it has no such field.
        if not hf.take_bool("rope_interleave", True):
            raise hf.error("rope_interleave", False, "transformers' deepseek_v2 always uses the interleaved RoPE "
                           "layout; use model_type deepseek_v3 for the half-split one")
        return True

    def _router(self, hf: HFConfig, top_k: int) -> RouterConfig:
        # scoring_func is hub-only (DeepSeek's code); transformers always runs softmax for V2.
        self._choice(hf, "scoring_func", "softmax", ("softmax",), "DeepSeek-V2 scores experts by softmax")
        method = self._choice(hf, "topk_method", "greedy", ("greedy", "group_limited_greedy"),
                              "transformers' deepseek_v2 runs only these selections")
        n_group, limit = 1, None
        if method == "group_limited_greedy":
            n_group, limit = hf.take_int("n_group"), hf.take_int("topk_group")
        else:
            hf.ignore("n_group", "topk_group")  # greedy reads neither (V2-Lite states 1 and 1)
        norm = hf.take_bool("norm_topk_prob", False)
        scale = hf.take_float("routed_scaling_factor", 1.0, minimum=0.0, allow_equal=False)
        # NOTE: DeepSeek's V2 code renormalises the top-k gates *instead of* scaling them when top_k > 1 and
        # norm_topk_prob is set; transformers 5 ignores norm_topk_prob for deepseek_v2 and always scales. moelab
        # follows DeepSeek's code (the checkpoints' own); export refuses renormalised gates. Every released V2
        # checkpoint has norm_topk_prob false, where the two agree.
        norm = norm and top_k > 1
        alpha, seq = _balance_loss(hf)
        return RouterConfig(type="deepseek_v2", top_k=top_k, norm_topk_prob=norm,
                            routed_scaling_factor=1.0 if norm else scale, n_group=n_group, topk_group=limit,
                            # DeepSeek's code has the expert-level loss only (no device / communication terms)
                            expert_balance_coef=alpha, device_balance_coef=0.0, comm_balance_coef=0.0,
                            balance_scope=None if seq is None else "sequence" if seq else "batch")

    def _router_problems(self, cfg: ModelConfig) -> list[str]:
        r = cfg.moe.router
        if r.type == "topk" and (r.softmax_order != "softmax_then_topk" or r.norm_topk_prob):
            return ["a top-k router other than softmax then top-k without renormalisation"]
        p = []
        if r.norm_topk_prob:
            p.append("renormalised top-k gates (transformers' deepseek_v2 ignores norm_topk_prob)")
        if r.type == "deepseek_v2" and r.topk_groups < r.n_group and \
                group_score_width(r.effective_group_score, r.top_k, r.topk_groups) != 1:
            p.append(f"group score {r.effective_group_score} (DeepSeek-V2 scores a group by its max)")
        return p

    def _router_to_hf(self, cfg: ModelConfig) -> dict:
        r = cfg.moe.router
        limited = r.type == "deepseek_v2" and r.topk_groups < r.n_group
        coefs = r.loss_coefs()
        return {"scoring_func": "softmax", "topk_method": "group_limited_greedy" if limited else "greedy",
                "n_group": r.n_group, "topk_group": r.topk_groups, "norm_topk_prob": False,
                # moelab's topk router has no scaling (its routed_scaling_factor is unused)
                "routed_scaling_factor": r.routed_scaling_factor if r.type == "deepseek_v2" else 1.0,
                "mlp_bias": False,
                "aux_loss_alpha": coefs["expert_balance"], "seq_aux": r.effective_balance_scope == "sequence"}

    def dropped_settings(self, cfg: ModelConfig) -> list[str]:
        return _dropped(cfg, {"expert_balance", "z_loss"})


class DeepseekV3Adapter(_DeepSeekAdapter):
    """DeepSeek-V3 routing (§4.3): sigmoid scores, selection on s + ``e_score_correction_bias``, the
    ``topk_group`` of ``n_group`` groups with the highest sum of their top-2 (s + b), gates from s,
    renormalised (``norm_topk_prob``) and x ``routed_scaling_factor``; RoPE interleaved or half-split
    (``rope_interleave``); MTP layers (``num_nextn_predict_layers``)."""

    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    export_routers = ("deepseek_v3",)
    has_mtp = True
    defaults = dict(n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, n_shared_experts=1,
                    moe_intermediate_size=2048, intermediate_size=18432)

    def _rope_interleave(self, hf: HFConfig) -> bool:
        return hf.take_bool("rope_interleave", True)

    def _router(self, hf: HFConfig, top_k: int) -> RouterConfig:
        # scoring_func / topk_method are hub-only (DeepSeek's code); transformers always runs this router for V3.
        self._choice(hf, "scoring_func", "sigmoid", ("sigmoid",), "DeepSeek-V3 scores experts by sigmoid")
        self._choice(hf, "topk_method", "noaux_tc", ("noaux_tc",), "DeepSeek-V3 selects on scores + bias")
        # NOTE: with top_k = 1 DeepSeek's code skips the renormalisation and transformers does not (its gate is
        # then 1); moelab follows transformers, as every released V3 checkpoint has top_k 8.
        alpha, seq = _balance_loss(hf)
        batch_wise = seq is False  # the batch-wise variant of the V3 loss (§4.5.3): expert balance over the batch
        return RouterConfig(type="deepseek_v3", top_k=top_k, n_group=hf.take_int("n_group", 8),
                            topk_group=hf.take_int("topk_group", 4),
                            norm_topk_prob=hf.take_bool("norm_topk_prob", True),
                            routed_scaling_factor=hf.take_float("routed_scaling_factor", 2.5, minimum=0.0,
                                                                allow_equal=False),
                            seq_balance_coef=0.0 if batch_wise else alpha,
                            expert_balance_coef=alpha if batch_wise else None,
                            balance_scope="batch" if batch_wise else None)

    def _mtp(self, hf: HFConfig) -> MTPConfig | None:
        n = hf.take_int("num_nextn_predict_layers", 1, "num_mtp_layers", minimum=0)
        return MTPConfig(num_modules=n) if n else None

    def fit_checkpoint(self, cfg: ModelConfig, hf_keys: set[str]) -> ModelConfig:
        if cfg.mtp is None or any(k.startswith(f"model.layers.{cfg.num_layers}.") for k in hf_keys):
            return cfg
        warnings.warn(f"config.json names {cfg.mtp.num_modules} MTP layer(s) (num_nextn_predict_layers) but the "
                      f"checkpoint has no model.layers.{cfg.num_layers}.* weights (transformers does not keep them); "
                      "loading without MTP modules", stacklevel=3)
        return dataclasses.replace(cfg, mtp=None)

    def _router_problems(self, cfg: ModelConfig) -> list[str]:
        r = cfg.moe.router
        p = []
        if r.topk_groups < r.n_group and group_score_width(r.effective_group_score, r.top_k, r.topk_groups) != 2:
            p.append(f"group score {r.effective_group_score} (transformers' deepseek_v3 sums each group's top 2)")
        if cfg.moe.num_experts // r.n_group < 2:
            p.append("groups of one expert (transformers' deepseek_v3 sums each group's top 2)")
        return p

    def _router_to_hf(self, cfg: ModelConfig) -> dict:
        r = cfg.moe.router
        coefs = r.loss_coefs()
        batch_wise = coefs["seq_balance"] == 0 and coefs["expert_balance"] > 0 and r.effective_balance_scope == "batch"
        return {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": r.n_group,
                "topk_group": r.topk_groups, "norm_topk_prob": r.norm_topk_prob is not False,
                "routed_scaling_factor": r.routed_scaling_factor,
                "aux_loss_alpha": coefs["expert_balance"] if batch_wise else coefs["seq_balance"],
                "seq_aux": not batch_wise}

    def _extra_to_hf(self, cfg: ModelConfig) -> dict:
        return {"rope_interleave": cfg.attention.mla.rope_interleave,
                "num_nextn_predict_layers": cfg.mtp.num_modules if cfg.mtp is not None else 0}

    def dropped_settings(self, cfg: ModelConfig) -> list[str]:
        coefs = cfg.moe.router.loss_coefs()
        kept = {"seq_balance", "z_loss"} if coefs["seq_balance"] > 0 or coefs["expert_balance"] == 0 \
            else {"expert_balance", "z_loss"}
        return _dropped(cfg, kept)

    def extra_rules(self, cfg: ModelConfig) -> list[Rule]:
        """MTP module k at HF layer L + k: its own norms and projection, its decoder layer (the layer rules
        with blocks.{i} -> mtp.{k}.block) and the copies of the shared embedding and head."""
        if cfg.mtp is None:
            return []
        head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
        rules = []
        for k in range(cfg.mtp.num_modules):
            hf_layer, ml = f"model.layers.{cfg.num_layers + k}", f"mtp.{k}"
            rules += [copy(f"{hf_layer}.{name}.weight", f"{ml}.{name}.weight")
                      for name in ("enorm", "hnorm", "eh_proj")]
            rules += [copy(f"{hf_layer}.shared_head.norm.weight", f"{ml}.norm.weight"),
                      duplicate(f"{hf_layer}.embed_tokens.weight", "embed.weight"),
                      duplicate(f"{hf_layer}.shared_head.head.weight", head)]
            rules += [dataclasses.replace(r, hf=tuple(h.format(i=cfg.num_layers + k) for h in r.hf),
                                          ml=tuple(m.replace("blocks.{i}.", f"{ml}.block.") for m in r.ml))
                      for r in self.layer_rules(cfg)]
        return rules


def _dropped(cfg: ModelConfig, kept: set[str]) -> list[str]:
    """The router's training-only settings no DeepSeek config.json field holds: its active losses other than
    ``kept`` (the z-loss export names itself) and input jitter."""
    r = cfg.moe.router
    dropped = [f"router loss {name} (coef {coef:g})" for name, coef in r.active_losses().items() if name not in kept]
    return dropped + ([f"router input jitter (jitter_eps {r.jitter_eps:g})"] if r.jitter_eps else [])
