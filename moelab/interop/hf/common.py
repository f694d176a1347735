"""What every HF family adapter shares: declarative key rules, the adapter base class, and the
config fields common to the Llama-style families (mixtral, phimoe, qwen2_moe, qwen3_moe, olmoe).

A key rule ties one group of HF checkpoint keys to one group of moelab state-dict keys, with the
tensor transform each way (copy, stack experts, split a fused projection). Templates hold ``{i}``
(layer) and ``{e}`` (expert). A family lists every rule it could need; the rules whose moelab keys
are not in the built model (a bias the config turns off, the dense FFN of an MoE layer) are
dropped, so the moelab model, built from the mapped config, decides which HF keys must exist.

Shape legend: E experts, F expert FFN dim, D model dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moelab.config import load_balance_coef_from_hf as lb_coef_from_hf  # noqa: F401  (adapters)
from moelab.config import ModelConfig, YaRNConfig
from moelab.errors import MoelabError
from moelab.interop.hf.config_reader import HFConfig

Shapes = list[tuple[int, ...]]


class UnsupportedForFamily(MoelabError):
    """A moelab config uses features an HF family cannot express (raised by ``from_moelab``)."""

    def __init__(self, family: str, features: list[str]):
        self.family, self.features = family, features
        super().__init__(f"{family}: cannot express {', '.join(features)}")


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    ml: tuple[str, ...]
    to_ml: Callable[[list[torch.Tensor], Shapes], list[torch.Tensor]]
    to_hf: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    # True for expert stacking: HF key j is row j of the single moelab tensor, so a loader can copy
    # each expert into place as it arrives instead of holding all E until the stack is complete.
    stacked: bool = False
    # True when the HF key is a second copy of a moelab tensor that another rule maps (DeepSeek-V3's MTP
    # layer stores its own embed_tokens and shared_head.head): export writes the copy, load checks that it
    # equals the tensor and never writes it.
    duplicate: bool = False

    def format(self, **kw) -> Rule:
        return dataclasses.replace(self, hf=tuple(k.format(**kw) for k in self.hf),
                                   ml=tuple(k.format(**kw) for k in self.ml))


def copy(hf: str, ml: str) -> Rule:
    return Rule((hf,), (ml,), lambda ts, shapes: ts, lambda ts: ts)


def duplicate(hf: str, ml: str) -> Rule:
    """An HF key holding a copy of moelab tensor ``ml`` (mapped by another rule too)."""
    return dataclasses.replace(copy(hf, ml), duplicate=True)


def stack(hf_template: str, ml: str, num_experts: int) -> Rule:
    """E per-expert (F, D) or (D, F) tensors <-> one stacked (E, F, D) / (E, D, F) tensor."""
    hf = tuple(hf_template.replace("{e}", str(e)) for e in range(num_experts))
    return Rule(hf, (ml,), lambda ts, shapes: [torch.stack(ts, dim=0)], lambda ts: list(ts[0].unbind(0)),
                stacked=True)


def split_rows(hf: str, mls: tuple[str, ...]) -> Rule:
    """One fused (sum of rows, D) matrix (DBRX Wqkv) <-> several (rows_j, D) matrices."""
    return Rule((hf,), mls, lambda ts, shapes: list(torch.split(ts[0], [s[0] for s in shapes], dim=0)),
                lambda ts: [torch.cat(ts, dim=0)])


def rows_to_stacked(hf: str, ml: str, transpose: bool = False) -> Rule:
    """DBRX expert layout: (E*F, D) rows <-> (E, F, D); with ``transpose`` (E*F, D) <-> (E, D, F)."""

    def to_ml(ts, shapes):
        E, a, b = shapes[0]
        F_, D = (b, a) if transpose else (a, b)
        x_EFD = ts[0].reshape(E, F_, D)
        return [x_EFD.transpose(1, 2) if transpose else x_EFD]

    def to_hf(ts):
        x = ts[0].transpose(1, 2) if transpose else ts[0]  # (E, F, D)
        return [x.reshape(-1, x.shape[-1])]

    return Rule((hf,), (ml,), to_ml, to_hf)


# ---- config helpers ------------------------------------------------------------------------------

_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh"}  # gelu_new is the same tanh formula written out
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def activation_from_hf(hf: HFConfig, name: str = "hidden_act", value: str | None = None) -> str:
    act = hf.take(name, "silu") if value is None else value
    if act not in _ACT_FROM_HF:
        raise hf.error(name, act, f"activation not supported by moelab; supported: {', '.join(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[act]


def activation_to_hf(cfg: ModelConfig) -> str:
    return _ACT_TO_HF[cfg.activation]


def rope_theta_from_hf(hf: HFConfig, default: float) -> float:
    """Plain RoPE only: the theta of :func:`rope_from_hf`; every scaled RoPE type is an error naming it,
    except when the config is read only to count parameters."""
    return rope_from_hf(hf, default)["rope_theta"]


def rope_from_hf(hf: HFConfig, default_theta: float, scaled: tuple[str, ...] = ()) -> dict:
    """The RoPE fields of AttentionConfig. Reads ``rope_parameters`` (transformers >= 5) or ``rope_theta`` +
    ``rope_scaling`` (older config.json files). A scaled RoPE type is mapped when the family runs it
    (``scaled``: phimoe's ``longrope``, DeepSeek's ``yarn``); any other (linear, dynamic, llama3, yarn or
    longrope elsewhere) is an error naming the type, except when the config is read only to count parameters."""
    params = hf.take("rope_parameters", None)
    scaling = hf.take("rope_scaling", None)
    theta = hf.take("rope_theta", None)
    # The hub's Phi-3.5-MoE config.json repeats original_max_position_embeddings at the top level; HF
    # copies the longrope block's value over it, so the block wins and the top level is a fallback.
    top_original_max = hf.take("original_max_position_embeddings", None) if scaled else None
    fields: dict = {}
    for name, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if block is None:
            continue
        if not isinstance(block, dict):
            raise hf.error(name, block, "must be a mapping")
        block = dict(block)
        rtype = block.pop("rope_type", block.pop("type", "default"))
        if "rope_theta" in block:
            theta = block.pop("rope_theta")
        if rtype == "default" and not block:
            continue
        if rtype == "longrope" and "longrope" in scaled:
            sub = HFConfig(block, f"{hf.where} {name}", hf.counting_only)
            sub.model_type = hf.model_type
            these = _longrope_from_hf(sub, top_original_max)
            sub.finish()
            if fields and fields != these:
                raise hf.error(name, block, "rope_parameters and rope_scaling disagree; keep one of them")
            fields = these
        elif rtype == "yarn" and "yarn" in scaled:
            sub = HFConfig(block, f"{hf.where} {name}", hf.counting_only)
            sub.model_type = hf.model_type
            these = _yarn_from_hf(sub, top_original_max, hf.data.get("max_position_embeddings"))
            sub.finish()
            if fields and fields != these:
                raise hf.error(name, block, "rope_parameters and rope_scaling disagree; keep one of them")
            fields = these
        elif not hf.counting_only:
            runs = "plain RoPE (rope_type 'default' with rope_theta)" + "".join(f" and {t}" for t in scaled)
            raise hf.error(f"{name}.rope_type", rtype if rtype != "default" else block,
                           f"moelab runs only {runs} for {hf.model_type}; other scaled RoPE variants are not "
                           "supported yet")
    theta = default_theta if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise hf.error("rope_theta", theta, "must be a positive number")
    return {"rope_theta": float(theta), **fields}


def _longrope_from_hf(block: HFConfig, top_original_max: int | None) -> dict:
    """HF phimoe's longrope block -> AttentionConfig fields. Both mscales are required, as HF
    PhimoeConfig.validate_rope requires them."""
    factors = {}
    for hf_name in ("short_factor", "long_factor"):
        value = block.take(hf_name)
        if not isinstance(value, list) or any(isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0
                                              for f in value):
            raise block.error(hf_name, value, "must be a list of positive numbers (head_dim / 2 of them)")
        factors[hf_name] = tuple(float(f) for f in value)
    original = block.take("original_max_position_embeddings", top_original_max)
    if isinstance(original, bool) or not isinstance(original, int) or original < 2:
        raise block.error("original_max_position_embeddings", original, "must be an integer >= 2")
    # factor / attention_factor only set HF's default attention scale, which phimoe never uses: its
    # forward always takes short_mscale / long_mscale.
    block.ignore("factor", "attention_factor")
    return {"rope_type": "longrope", "rope_short_factor": factors["short_factor"],
            "rope_long_factor": factors["long_factor"], "rope_original_max_len": original,
            "rope_short_mscale": block.take_float("short_mscale", minimum=0.0, allow_equal=False),
            "rope_long_mscale": block.take_float("long_mscale", minimum=0.0, allow_equal=False)}


def _yarn_from_hf(block: HFConfig, top_original_max: int | None, max_pos: int | None) -> dict:
    """An HF yarn block -> AttentionConfig fields, with transformers' defaults (``_compute_yarn_parameters``):
    a top-level original_max_position_embeddings wins over the block's (``standardize_rope_params``), and
    either falls back to max_position_embeddings; beta_fast / beta_slow of 0 or null mean 32 / 1."""
    factor = block.take_float("factor", minimum=0.0, allow_equal=False)  # required: MLA's softmax scale reads it
    original = top_original_max if top_original_max is not None else block.take(
        "original_max_position_embeddings", max_pos)
    block.ignore("original_max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise block.error("original_max_position_embeddings", original, "must be a positive integer")
    mscale_all_dim = block.take_float("mscale_all_dim", 0.0)
    # HF tests ``if mscale and mscale_all_dim``: a missing mscale acts as 0, which moelab's YaRNConfig
    # reads the same way (its default 1.0 would change the cos/sin factor when mscale_all_dim is set).
    mscale = block.take_float("mscale", 0.0 if mscale_all_dim else 1.0)
    attention_factor = block.take("attention_factor", None)
    if attention_factor is not None:
        attention_factor = block.take_float("attention_factor", minimum=0.0, allow_equal=False)
    yarn = YaRNConfig(factor=factor, original_max_len=original,
                      beta_fast=block.take_float("beta_fast", 0.0) or 32.0,
                      beta_slow=block.take_float("beta_slow", 0.0) or 1.0,
                      mscale=mscale, mscale_all_dim=mscale_all_dim, attention_factor=attention_factor,
                      truncate=block.take_bool("truncate", True))
    return {"rope_type": "yarn", "yarn": yarn}


def rope_to_hf(cfg: ModelConfig) -> dict:
    """The inverse of :func:`rope_from_hf`: ``rope_parameters`` (+ ``rope_theta``, and for longrope the
    top-level ``original_max_position_embeddings`` the hub configs carry). Unset mscales are written
    resolved (HF phimoe requires both)."""
    a = cfg.attention
    if a.rope_type == "default":
        return {"rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta}, "rope_theta": a.rope_theta}
    if a.rope_type == "yarn":
        y = a.yarn
        block = {"rope_type": "yarn", "rope_theta": a.rope_theta, "factor": y.factor,
                 "original_max_position_embeddings": y.original_max_len, "beta_fast": y.beta_fast,
                 "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
                 "truncate": y.truncate}
        if y.attention_factor is not None:
            block["attention_factor"] = y.attention_factor
        return {"rope_parameters": block, "rope_theta": a.rope_theta}
    short_mscale, long_mscale = cfg.rope_mscales()
    return {"rope_parameters": {"rope_type": "longrope", "rope_theta": a.rope_theta,
                                "short_factor": list(a.rope_short_factor), "long_factor": list(a.rope_long_factor),
                                "short_mscale": short_mscale, "long_mscale": long_mscale,
                                "original_max_position_embeddings": a.rope_original_max_len},
            "rope_theta": a.rope_theta, "original_max_position_embeddings": a.rope_original_max_len}


def lb_coef_to_hf(cfg: ModelConfig) -> float:
    n = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    return cfg.moe.router.loss_coefs()["load_balance"] * n / cfg.moe.router.top_k


def common_export_problems(cfg: ModelConfig, rope_types: tuple[str, ...] = ("default",),
                           routers: tuple[str, ...] = ("topk", "sparsemixer"), mla: bool = False, mtp: bool = False,
                           scaled_gates: bool = False, window_pattern: bool = False) -> list[str]:
    """Features no supported HF family expresses. What the family can say: ``rope_types`` (the RoPE
    variants it runs), ``routers`` (the router types it may map), ``mla`` (multi-head latent attention),
    ``mtp`` (MTP modules), ``scaled_gates`` (a routed_scaling_factor), ``window_pattern`` (sliding
    windows on some layers and full attention on the others)."""
    p = []
    if len({cfg.layer_window(i) for i in range(cfg.num_layers)}) > 1 and not window_pattern:
        p.append("sliding windows on some layers only (attention.window_layers; qwen2_moe only)")
    if cfg.attention.rope_type not in rope_types:
        p.append(f"attention.rope_type={cfg.attention.rope_type}")
    if cfg.attention.mla is not None and not mla:
        p.append("multi-head latent attention (attention.mla; deepseek_v2 / deepseek_v3 only)")
    if cfg.mtp is not None and not mtp:
        p.append("MTP modules (mtp; deepseek_v3 only)")
    if cfg.moe is None:
        p.append("a dense model (moe: null)")
        return p
    if cfg.sandwich_norm:
        p.append("sandwich_norm")
    if cfg.attention.logit_softcap is not None:
        p.append("attention.logit_softcap")
    if cfg.embedding_multiplier != 1.0:
        p.append("embedding_multiplier")
    if cfg.output_multiplier != 1.0:
        p.append("output_multiplier")
    if cfg.moe.router.temperature != 1.0:
        p.append("moe.router.temperature")
    if cfg.moe.router.routed_scaling_factor != 1.0 and not scaled_gates:
        p.append("moe.router.routed_scaling_factor")
    if cfg.moe.router.eval_capacity_factor is not None:
        p.append("moe.router.eval_capacity_factor (token dropping at inference)")
    if cfg.moe.router.type not in routers:
        p.append(f"moe.router.type={cfg.moe.router.type}")
    if cfg.moe.aoe is not None:
        p.append("Autonomy-of-Experts experts (moe.aoe; no transformers model has them)")
    if cfg.moe.router.hidden_dim is not None:
        p.append("an MLP router (moe.router.hidden_dim)")
    return p


def moe_layer_problems(cfg: ModelConfig) -> list[str]:
    """For families whose every layer is an MoE layer."""
    if all(cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
        return []
    return ["dense layers (first_k_dense / moe_every / dense_layers)"]


class Adapter:
    """One HF family: config mapping both ways plus its key rules."""

    model_type: str = ""
    architecture: str = ""

    def to_moelab(self, hf: HFConfig) -> ModelConfig:  # pragma: no cover - abstract
        raise NotImplementedError

    def from_moelab(self, cfg: ModelConfig) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def global_rules(self, cfg: ModelConfig) -> list[Rule]:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_rules(self, cfg: ModelConfig) -> list[Rule]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_rules(self, cfg: ModelConfig) -> list[Rule]:
        """Rules outside the main stack (DeepSeek-V3's MTP layers); formatted already."""
        return []

    def fit_checkpoint(self, cfg: ModelConfig, hf_keys: set[str]) -> ModelConfig:
        """``cfg`` adjusted to what the checkpoint holds (DeepSeek-V3: MTP layers the config names but the
        checkpoint lacks); by default unchanged."""
        return cfg

    def dropped_settings(self, cfg: ModelConfig) -> list[str]:
        """Training-only settings the family's config.json cannot hold, besides the router z-loss (export
        warns about each)."""
        return []

    def rules(self, cfg: ModelConfig, ml_keys: set[str]) -> list[Rule]:
        """Every rule whose moelab keys all exist in the model (the config switches the rest off)."""
        candidates = list(self.global_rules(cfg))
        for i in range(cfg.num_layers):
            candidates += [r.format(i=i) for r in self.layer_rules(cfg)]
        candidates += self.extra_rules(cfg)
        kept = []
        for r in candidates:
            present = [k in ml_keys for k in r.ml]
            if all(present):
                kept.append(r)
            elif any(present):  # pragma: no cover - a rule must be all-or-nothing
                raise AssertionError(f"{self.model_type} rule {r.ml} only partly present in the model")
        return kept


# ---- Llama-style families ------------------------------------------------------------------------

def llama_attention_rules(prefix: str = "model.layers.{i}.self_attn") -> list[Rule]:
    rules = []
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for leaf in ("weight", "bias"):
            rules.append(copy(f"{prefix}.{proj}.{leaf}", f"blocks.{{i}}.attn.{proj}.{leaf}"))
    rules += [copy(f"{prefix}.q_norm.weight", "blocks.{i}.attn.q_norm.weight"),
              copy(f"{prefix}.k_norm.weight", "blocks.{i}.attn.k_norm.weight")]
    return rules


def llama_norm_rules() -> list[Rule]:
    rules = []
    for leaf in ("weight", "bias"):
        rules += [copy(f"model.layers.{{i}}.input_layernorm.{leaf}", f"blocks.{{i}}.attn_norm.{leaf}"),
                  copy(f"model.layers.{{i}}.post_attention_layernorm.{leaf}", f"blocks.{{i}}.ffn_norm.{leaf}")]
    return rules


def llama_global_rules() -> list[Rule]:
    rules = [copy("model.embed_tokens.weight", "embed.weight")]
    for leaf in ("weight", "bias"):
        rules += [copy(f"model.norm.{leaf}", f"norm.{leaf}"), copy(f"lm_head.{leaf}", f"lm_head.{leaf}")]
    return rules


def llama_dense_mlp_rules(prefix: str = "model.layers.{i}.mlp") -> list[Rule]:
    return [copy(f"{prefix}.{p}.weight", f"blocks.{{i}}.ffn.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]


@dataclass
class LlamaCommon:
    """The fields every Llama-style family shares, read from (or written to) config.json."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None
    max_seq_len: int
    norm_eps: float
    tie: bool
    activation: str
    init_std: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # AttentionConfig fields of a scaled RoPE (phimoe longrope)


def read_llama_common(hf: HFConfig, default_theta: float, eps_default: float = 1e-6,
                      scaled_rope: tuple[str, ...] = ()) -> LlamaCommon:
    d = hf.take_int("hidden_size")
    heads = hf.take_int("num_attention_heads")
    head_dim = hf.take("head_dim", None)
    if head_dim is not None:
        head_dim = hf.take_int("head_dim")
        if head_dim == d // heads and d % heads == 0:
            head_dim = None  # the default; keep moelab's config minimal
    common = LlamaCommon(
        vocab_size=hf.take_int("vocab_size"), d_model=d, num_layers=hf.take_int("num_hidden_layers"),
        num_heads=heads, num_kv_heads=hf.take_int("num_key_value_heads", heads), head_dim=head_dim,
        max_seq_len=hf.take_int("max_position_embeddings", 4096),
        norm_eps=hf.take_float("rms_norm_eps", eps_default, minimum=0.0, allow_equal=False),
        tie=hf.take_bool("tie_word_embeddings", False), activation=activation_from_hf(hf),
        init_std=hf.take_float("initializer_range", 0.02, minimum=0.0, allow_equal=False),
        **_split_rope(rope_from_hf(hf, default_theta, scaled_rope)))
    # attention_dropout is applied by HF only in training; moelab has no dropout, so inference is exact.
    hf.take_float("attention_dropout", 0.0)
    return common


def _split_rope(fields: dict) -> dict:
    fields = dict(fields)
    return {"rope_theta": fields.pop("rope_theta"), "rope_scaling": fields}


def write_llama_common(cfg: ModelConfig) -> dict:
    a = cfg.attention
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": activation_to_hf(cfg),
        "initializer_range": cfg.init_std, "attention_dropout": 0.0,
        **rope_to_hf(cfg),
    }


def same_float(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def qwen_style_moe_rules(num_experts: int, prefix: str = "model.layers.{i}.mlp") -> list[Rule]:
    """Router ``mlp.gate``, experts ``mlp.experts.{e}.{gate,up,down}_proj``, Qwen2-MoE's shared expert
    ``mlp.shared_expert.*`` + ``mlp.shared_expert_gate`` and the dense FFN ``mlp.{gate,up,down}_proj``
    (used by Qwen2-MoE, Qwen3-MoE, OLMoE)."""
    rules = [copy(f"{prefix}.gate.weight", "blocks.{i}.ffn.router.weight")]
    for hf_name, ml in (("gate_proj", "gate_EFD"), ("up_proj", "up_EFD"), ("down_proj", "down_EDF")):
        rules.append(stack(f"{prefix}.experts.{{e}}.{hf_name}.weight", f"blocks.{{i}}.ffn.experts.{ml}", num_experts))
    rules += [copy(f"{prefix}.shared_expert.{p}.weight", f"blocks.{{i}}.ffn.shared.{p}.weight")
              for p in ("gate_proj", "up_proj", "down_proj")]
    rules.append(copy(f"{prefix}.shared_expert_gate.weight", "blocks.{i}.ffn.shared_gate.weight"))
    return rules + llama_dense_mlp_rules(prefix)


def qwen_layer_pattern(hf: HFConfig, num_layers: int, num_experts: int) -> dict:
    """``decoder_sparse_step`` and ``mlp_only_layers`` as moelab MoEConfig fields: layer i is MoE when
    (i + 1) % step == 0 and i is not in mlp_only_layers (HF Qwen2/3-MoE decoder layer)."""
    step = hf.take_int("decoder_sparse_step", 1)
    only = hf.take("mlp_only_layers", [])
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers
                                         for i in only):
        raise hf.error("mlp_only_layers", only, f"must be a list of layer indices in [0, {num_layers})")
    moe_layers = [i for i in range(num_layers) if (i + 1) % step == 0 and i not in only]
    return {"moe_every": step, "dense_layers": tuple(sorted(set(only))), "any_moe": bool(moe_layers and num_experts),
            "num_moe_layers": len(moe_layers)}


def qwen_layer_pattern_to_hf(cfg: ModelConfig) -> tuple[dict, list[str]]:
    """The inverse: only patterns of the form "every step-th layer, minus a list" are expressible."""
    m = cfg.moe
    step = m.moe_every
    offset = step - 1 if m.moe_offset is None else m.moe_offset
    if offset != step - 1:
        return {}, ["moe_offset other than moe_every - 1"]
    only = sorted(i for i in range(cfg.num_layers) if (i + 1) % step == 0 and not cfg.is_moe_layer(i))
    return {"decoder_sparse_step": step, "mlp_only_layers": only}, []


def topk_router_problems(cfg: ModelConfig, any_norm_p: bool = False) -> list[str]:
    """A top-k router, with gates renormalised by their sum (only DBRX, ``any_norm_p``, has p-norms)."""
    r = cfg.moe.router
    if r.type != "topk":
        return [f"router type {r.type}"]
    if r.topk_norm_p != 1.0 and not any_norm_p:
        return [f"top-k gates divided by their p-norm with p = {r.topk_norm_p:g} (only dbrx has p-norms)"]
    return []


def norm_topk_prob_of(cfg: ModelConfig) -> bool:
    """topk_then_softmax gates equal softmax_then_topk renormalised gates (REFERENCES §1.4)."""
    r = cfg.moe.router
    return r.softmax_order == "topk_then_softmax" or bool(r.norm_topk_prob)  # None: topk default, False
