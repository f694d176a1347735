"""The config tree: ModelConfig > AttentionConfig, MoEConfig > RouterConfig.

Every dataclass validates itself in ``__post_init__`` and raises :class:`ConfigError` (a ValueError)
naming the field, the bad value and the fix. Configs round-trip exactly through YAML and JSON
(``save_config`` / ``load_config``); unknown keys are an error, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moelab.errors import ConfigError
from moelab.fileio import write_atomic

# Router families moelab knows; moelab.moe.routing.ROUTERS must hold exactly these names.
ROUTER_TYPES = ("topk", "sparsemixer", "switch", "noisy_topk", "expert_choice", "top_p", "deepseek_v2", "deepseek_v3")
DROP_PRIORITIES = ("position", "score")
BALANCE_SCOPES = ("batch", "sequence")
EXPERT_CHOICE_EVAL = ("topk", "batch")
# How group-limited routing scores a group (DeepSeek device/node-limited routing): its best
# affinity (V2), the sum of its best 2 (V3's released code and transformers), or the sum of its best
# top_k // topk_group (the V3 paper: "the highest K_r/M affinity scores"; Megatron's topk // group_topk).
GROUP_SCORES = ("max", "sum_top2", "sum_top_k_over_m")

# The balancing each router family's paper trains with, used for every loss field left at None.
# A coefficient the user sets (0 included) is always honoured. Loss names are RouterConfig fields
# without the "_coef"/"_loss_coef" suffix, as logged in ``aux_losses``.
ROUTER_LOSS_DEFAULTS: dict[str, dict[str, float]] = {
    "topk": {"load_balance": 0.01},  # Switch eq. 4, alpha = 1e-2 (GShard / Mixtral practice)
    "switch": {"load_balance": 0.01},  # Fedus et al. 2021 §2.2
    "sparsemixer": {"load_balance": 0.01},  # GRIN / Phi-3.5-MoE train with a Switch-style loss
    "noisy_topk": {"importance": 0.1, "noisy_load": 0.1},  # Shazeer et al. 2017 §4, App. A (w = 0.1)
    "expert_choice": {},  # Zhou et al. 2022: balanced by construction, no aux loss
    "top_p": {"load_balance": 0.01, "entropy": 1e-4},  # Huang et al. 2024: L_b + beta L_d
    # DeepSeek-V2 §2.2.3 alpha1/alpha2/alpha3, per sequence; device and comm only with n_group > 1
    "deepseek_v2": {"expert_balance": 0.003, "device_balance": 0.05, "comm_balance": 0.02},
    "deepseek_v3": {"seq_balance": 1e-4},  # V3 eq. 17-20; plus the aux-loss-free bias (gamma 1e-3)
}
DEFAULT_BIAS_UPDATE_RATE = {"deepseek_v3": 1e-3}  # V3 §2.1.2 gamma
LOSS_FIELDS = {"load_balance": "load_balance_coef", "z_loss": "z_loss_coef", "importance": "importance_loss_coef",
               "noisy_load": "noisy_load_loss_coef", "entropy": "entropy_loss_coef",
               "expert_balance": "expert_balance_coef", "device_balance": "device_balance_coef",
               "comm_balance": "comm_balance_coef", "seq_balance": "seq_balance_coef"}
NORM_TYPES = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
QK_NORM_TYPES = ("none", "per_head", "full")
SOFTMAX_ORDERS = ("topk_then_softmax", "softmax_then_topk")
ROPE_TYPES = ("default", "longrope", "yarn")
AOE_NORMS = ("l2", "l1", "linf")
# Selection rules AoE can run on its norm scores (AoE paper Alg. 2 top-k; Table 3 top-p, expert choice).
AOE_SELECTIONS = ("topk", "top_p", "expert_choice")


MAX_SIZE = 2**31 - 1  # any one size (dimension, count, length): beyond it no tensor can be built


def _positive(name: str, value: int | float, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero) or value != value:
        need = "a non-negative number" if allow_zero else "a positive number"
        raise ConfigError(name, value, f"must be {need}")
    if isinstance(value, float) and math.isinf(value):
        raise ConfigError(name, value, "must be finite")
    if isinstance(value, int) and value > MAX_SIZE:  # sizes; float settings (rope_theta ...) have no bound
        raise ConfigError(name, value, f"is too large (at most {MAX_SIZE:,})")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(name, value, f"unknown value; choose one of {', '.join(options)}")


@dataclass
class RouterConfig:
    """How tokens pick experts, the capacity of each expert, and the balancing losses.

    ``type="topk"`` is token-choice softmax top-k in its two standard forms:
    - ``softmax_order="topk_then_softmax"`` (Mixtral): top-k over the logits, softmax over those k.
    - ``softmax_order="softmax_then_topk"`` (Switch, GShard, Qwen-MoE, DeepSeekMoE): softmax over all
      experts, then top-k; ``norm_topk_prob`` renormalises the k gates to sum to 1 (otherwise they
      sum to < 1 on purpose).
    Other families (one file each under ``moelab/moe/routers/``): ``switch`` (Switch top-1, needs
    ``top_k=1``), ``noisy_topk`` (Shazeer 2017), ``expert_choice`` (Zhou 2022), ``top_p`` (Huang 2024;
    ``top_k`` is only the nominal budget), ``deepseek_v2`` (softmax, group-limited, scaled) and
    ``deepseek_v3`` (sigmoid, top-k on s + bias, aux-loss-free bias).
    Every loss coefficient is 0 = off; each loss is logged under its own name in ``aux_losses``.
    """

    type: str = "topk"
    top_k: int = 2
    softmax_order: str = "topk_then_softmax"
    # None: the router family's default (False for topk / deepseek_v2, True for deepseek_v3 eq. 13).
    norm_topk_prob: bool | None = None
    # Switch load-balancing loss alpha * E * sum_i f_i P_i (Fedus et al. eq. 4); 1e-2 in the paper.
    # Every loss coefficient: None = the router family's paper default (ROUTER_LOSS_DEFAULTS,
    # ``loss_coefs()``), 0 = off, any other value as given.
    load_balance_coef: float | None = None
    # ST-MoE router z-loss (1/T) sum_t logsumexp(logits_t)^2 (Zoph et al. §3); 1e-3 in the paper.
    z_loss_coef: float | None = None
    # Shazeer 2017 importance loss CV(sum_t gates_t)^2, any router; 0.1 in the paper (UNVERIFIED).
    importance_loss_coef: float | None = None
    # Shazeer 2017 smooth load loss CV(Load)^2 with Load from Phi, noisy_topk only; 0.1 (UNVERIFIED).
    noisy_load_loss_coef: float | None = None
    # Added to the noise std softplus(x W_noise) (noisy_topk): keeps the load loss finite when the
    # softplus underflows; 1e-2 in tensor2tensor's and the public PyTorch ports' noisy gating.
    noise_epsilon: float = 1e-2
    # Huang et al. 2024 dynamic loss: mean per-token entropy of the router distribution; 1e-4.
    entropy_loss_coef: float | None = None
    # DeepSeekMoE eq. 12-17 expert-level (alpha1) and device-level (alpha2) balance, DeepSeek-V2
    # eq. 29-31 communication balance (alpha3): V2 uses 0.003 / 0.05 / 0.02. Devices = ``n_group``.
    expert_balance_coef: float | None = None
    device_balance_coef: float | None = None
    comm_balance_coef: float | None = None
    # DeepSeek-V3 eq. 17-20 sequence-wise balance loss, averaged over sequences; 1e-4 in V3.
    seq_balance_coef: float | None = None
    # Over which tokens T the expert / device / communication balance losses count f and P: the
    # whole batch, or each sequence with the losses averaged over sequences (DeepSeek-V2 §2.2.3
    # defines them per sequence; HF's ``seq_aux``). None: "sequence" for deepseek_v2, else "batch".
    balance_scope: str | None = None
    # Expert groups (devices / nodes) of E / n_group contiguous experts: group-limited routing keeps
    # the best ``topk_group`` groups (deepseek_v2 / deepseek_v3); the device and communication losses
    # use the same groups.
    n_group: int = 1
    topk_group: int | None = None  # None: all groups (no limit)
    # Group score (GROUP_SCORES); None: what the released checkpoints use, "max" for deepseek_v2
    # (DeepSeek-V2 code) and "sum_top2" for deepseek_v3 (DeepSeek-V3 code, transformers).
    group_score: str | None = None
    routed_scaling_factor: float = 1.0  # DeepSeek: gates x this (V2-236B 16.0, V3 2.5)
    # DeepSeek-V3 aux-loss-free balancing: after each optimizer step b += rate * sign(mean load - load)
    # (``moelab.moe.update_router_biases(model)``); gamma = 0.001 in V3. 0: the bias stays as loaded.
    # None: 0.001 for deepseek_v3 (the paper's schedule until its last 500B tokens).
    bias_update_rate: float | None = None
    # Dynamic top-p threshold p (top_p router); 0.4 in Huang et al.'s code.
    top_p: float = 0.4
    # Capacity per expert = ceil(capacity_factor * tokens * top_k / E); None = dropless (token
    # choice). Expert choice always uses it (None means 1.0). ST-MoE: 1.25 train / 2.0 eval.
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None  # in eval mode; None = dropless
    # Which assignments an over-full expert keeps. Both give every token's 1st choice priority over
    # any 2nd choice (GShard Alg. 1); within a choice rank "position" keeps earlier sequence
    # positions first (Switch), "score" higher top gates first (batch-prioritised routing, Riquelme
    # et al. 2021).
    drop_priority: str = "position"
    # Expert choice in eval mode: "topk" = causal token-choice top-k fallback (k = top_k, gates =
    # softmax probs); "batch" = expert choice over the batch as in training (sees future tokens;
    # refused with a KV cache, where each step would see one token and give it every expert).
    expert_choice_eval: str = "topk"
    # Training-only multiplicative input jitter U(1-eps, 1+eps) (Switch, Phi-3.5-MoE).
    jitter_eps: float = 0.0
    # Router logits are divided by this before any softmax.
    temperature: float = 1.0
    # type="sparsemixer" (Phi-3.5-MoE): a candidate expert survives a pick when its logit is within
    # relative distance 2*eps of the best candidate (HF phimoe ``router_jitter_noise``).
    sparsemixer_eps: float = 0.01
    # Router as a 2-layer MLP, logits = SiLU(x W_1) W_2 with W_1: d_model x hidden_dim (None: one
    # linear map). The AoE paper's "large router" ablation (Table 2, Config. 4) gives the router as
    # many parameters as AoE's W_down, E * d_low * d_model.
    hidden_dim: int | None = None
    # With norm_topk_prob (softmax_then_topk): the k gates are divided by their p-norm,
    # (sum_k g_k^p)^(1/p). p = 1 divides by their sum (Qwen3, DeepSeek-V3); DBRX's
    # ``moe_normalize_expert_weights`` may be any p > 0.
    topk_norm_p: float = 1.0

    def __post_init__(self) -> None:
        _choice("router.type", self.type, ROUTER_TYPES)
        _positive("router.top_k", self.top_k)
        _choice("router.softmax_order", self.softmax_order, SOFTMAX_ORDERS)
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ConfigError("router.jitter_eps", self.jitter_eps, "must be in [0, 1)")
        _positive("router.temperature", self.temperature)
        _positive("router.sparsemixer_eps", self.sparsemixer_eps, allow_zero=True)
        for name in (*LOSS_FIELDS.values(), "bias_update_rate"):
            if getattr(self, name) is not None:
                _positive(f"router.{name}", getattr(self, name), allow_zero=True)
        _positive("router.noise_epsilon", self.noise_epsilon, allow_zero=True)
        _positive("router.topk_norm_p", self.topk_norm_p)
        if self.hidden_dim is not None:
            _positive("router.hidden_dim", self.hidden_dim)
        if self.group_score is not None:
            _choice("router.group_score", self.group_score, GROUP_SCORES)
            if self.type not in ("deepseek_v2", "deepseek_v3"):
                raise ConfigError("router.group_score", self.group_score,
                                  "group scores apply to group-limited routing: router.type deepseek_v2 or deepseek_v3")
        _positive("router.routed_scaling_factor", self.routed_scaling_factor)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("router.top_p", self.top_p, "must be in (0, 1]")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) is not None:
                _positive(f"router.{name}", getattr(self, name))
        _choice("router.drop_priority", self.drop_priority, DROP_PRIORITIES)
        if self.balance_scope is not None:
            _choice("router.balance_scope", self.balance_scope, BALANCE_SCOPES)
        _choice("router.expert_choice_eval", self.expert_choice_eval, EXPERT_CHOICE_EVAL)
        _positive("router.n_group", self.n_group)
        if self.topk_group is not None:
            _positive("router.topk_group", self.topk_group)
            if self.topk_group > self.n_group:
                raise ConfigError("router.topk_group", self.topk_group,
                                  f"must be <= router.n_group={self.n_group} (groups kept out of n_group)")
            if self.topk_group < self.n_group and self.type not in ("deepseek_v2", "deepseek_v3"):
                raise ConfigError("router.topk_group", self.topk_group,
                                  "group-limited routing needs router.type deepseek_v2 or deepseek_v3")
        if self.topk_norm_p != 1.0 and not (self.type == "topk" and self.softmax_order == "softmax_then_topk"
                                             and self.norm_topk_prob):
            raise ConfigError("router.topk_norm_p", self.topk_norm_p,
                              "a p-norm other than 1 applies only to type=topk with softmax_order=softmax_then_topk "
                              "and norm_topk_prob=true; set those or leave topk_norm_p at 1")
        if self.type == "switch" and self.top_k != 1:
            raise ConfigError("router.top_k", self.top_k,
                              "router.type=switch is top-1: set top_k=1 (or use type=topk for k > 1)")
        if (self.noisy_load_loss_coef or 0) > 0 and self.type != "noisy_topk":
            raise ConfigError("router.noisy_load_loss_coef", self.noisy_load_loss_coef,
                              "the smooth load loss needs router.type=noisy_topk (its noise defines it)")
        if (self.bias_update_rate or 0) > 0 and self.type != "deepseek_v3":
            raise ConfigError("router.bias_update_rate", self.bias_update_rate,
                              "the aux-loss-free bias exists only for router.type=deepseek_v3")

    @property
    def topk_groups(self) -> int:
        """Groups a token may use (``topk_group``, or all ``n_group``)."""
        return self.n_group if self.topk_group is None else self.topk_group

    # ---- family defaults, resolved on use (so changing ``type`` changes them too) --------------------
    def loss_coefs(self) -> dict[str, float]:
        """Every loss coefficient in effect, by loss name: the field's value when set, else the
        router family's paper default (ROUTER_LOSS_DEFAULTS), else 0. Device and communication
        balance default to 0 with a single group (their value is then constant, with no gradient)."""
        defaults = dict(ROUTER_LOSS_DEFAULTS[self.type])
        if self.n_group == 1:
            defaults.pop("device_balance", None)
            defaults.pop("comm_balance", None)
        out = {}
        for name, fld in LOSS_FIELDS.items():
            value = getattr(self, fld)
            out[name] = float(defaults.get(name, 0.0) if value is None else value)
        return out

    def active_losses(self) -> dict[str, float]:
        """The losses with a coefficient > 0 (what training adds and logs)."""
        return {k: v for k, v in self.loss_coefs().items() if v > 0}

    @property
    def effective_bias_update_rate(self) -> float:
        if self.bias_update_rate is not None:
            return float(self.bias_update_rate)
        return DEFAULT_BIAS_UPDATE_RATE.get(self.type, 0.0)

    @property
    def effective_balance_scope(self) -> str:
        if self.balance_scope is not None:
            return self.balance_scope
        return "sequence" if self.type == "deepseek_v2" else "batch"

    @property
    def effective_group_score(self) -> str:
        if self.group_score is not None:
            return self.group_score
        return "max" if self.type == "deepseek_v2" else "sum_top2"

    def balancing(self) -> dict[str, Any]:
        """What training balances with, as plain data (logged in metrics.jsonl, shown by ``moelab params``)."""
        return {"losses": self.active_losses(), "bias_update_rate": self.effective_bias_update_rate,
                "balance_scope": self.effective_balance_scope, "summary": self.balancing_summary()}

    def balancing_summary(self) -> str:
        """One line naming the balancing in effect, e.g. 'load_balance 0.01, z_loss 0.001'."""
        parts = [f"{k} {v:g}" for k, v in self.active_losses().items()]
        if self.type == "deepseek_v3" and self.effective_bias_update_rate > 0:
            parts.append(f"aux-free bias gamma {self.effective_bias_update_rate:g}")
        scoped = {"expert_balance", "device_balance", "comm_balance"} & set(self.active_losses())
        if scoped:
            parts.append(f"({', '.join(sorted(scoped))} per {self.effective_balance_scope})")
        return ", ".join(parts) or "none"


def aoe_d_wide(d_model: int, d_ffn: int, d_low: int) -> int:
    """AoE eq. 5, rounded to the nearest integer: the d_wide at which an AoE expert
    (d_model*d_low + d_low*d_wide + 2*d_model*d_wide parameters) has the parameters of a SwiGLU
    expert of width d_ffn (3*d_model*d_ffn). 768/3072: d_low 64 -> 4393, 128 -> 4194, 256 -> 3840,
    512 -> 3264; 1280/5120, d_low 400 -> 6469 (the paper's 4B model states 6470)."""
    return max(1, round((3 * d_model * d_ffn - d_low * d_model) / (d_low + 2 * d_model)))


@dataclass
class AoEConfig:
    """Autonomy-of-Experts (Lv et al. 2025, arXiv 2501.13074, §3.2, Alg. 2): no router; every
    expert's gate projection is factorised W_g = W_down (d_model x d_low) W_up (d_low x d_wide), all
    experts compute x W_down for every token, and the norm of that d_low vector ranks them.
    ``moe.router.type`` picks the selection rule on the norms (topk, top_p or expert_choice).
    ``moe.expert_ffn_dim`` is the dense-equivalent d_ffn of eq. 5."""

    d_low: int = 64
    d_wide: int | None = None  # None: eq. 5 from d_model and moe.expert_ffn_dim (same parameters per expert)
    norm: str = "l2"  # the score: "l2" (the paper), "l1" or "linf" of x W_down^i (App. A)
    # False: the Table 2 ablation "factorised W_g with a router": AoE's experts, a conventional router
    router_free: bool = True

    def __post_init__(self) -> None:
        _positive("moe.aoe.d_low", self.d_low)
        if self.d_wide is not None:
            _positive("moe.aoe.d_wide", self.d_wide)
        _choice("moe.aoe.norm", self.norm, AOE_NORMS)


@dataclass
class MoEConfig:
    """The mixture-of-experts FFN and where it sits in the stack.

    Layer ``i`` is an MoE layer when ``i >= first_k_dense``, ``i not in dense_layers`` and
    ``i % moe_every == moe_offset`` (``moe_offset`` defaults to ``moe_every - 1``, i.e. every P-th
    layer counting from 1, as Switch and Qwen's ``decoder_sparse_step``; DeepSeek's
    ``moe_layer_freq`` uses offset 0).
    """

    num_experts: int = 8
    expert_ffn_dim: int = 512  # F of each routed expert (fine-grained experts: smaller than the dense F)
    num_shared_experts: int = 0
    shared_expert_ffn_dim: int | None = None  # per shared expert; defaults to expert_ffn_dim
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x w), w: D->1
    moe_every: int = 1
    moe_offset: int | None = None
    first_k_dense: int = 0
    dense_layers: tuple[int, ...] = ()
    router: RouterConfig = field(default_factory=RouterConfig)
    aoe: AoEConfig | None = None  # Autonomy-of-Experts experts (and, by default, no router)

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = _from_dict(RouterConfig, self.router, "moe.router")
        if isinstance(self.aoe, dict):
            self.aoe = _from_dict(AoEConfig, self.aoe, "moe.aoe")
        if self.aoe is not None and self.aoe.router_free:
            self._check_aoe_router()
        self.dense_layers = tuple(self.dense_layers)
        _positive("moe.num_experts", self.num_experts)
        _positive("moe.expert_ffn_dim", self.expert_ffn_dim)
        _positive("moe.num_shared_experts", self.num_shared_experts, allow_zero=True)
        if self.shared_expert_ffn_dim is not None:
            _positive("moe.shared_expert_ffn_dim", self.shared_expert_ffn_dim)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ConfigError("moe.shared_expert_gate", True, "needs moe.num_shared_experts >= 1")
        _positive("moe.moe_every", self.moe_every)
        if self.moe_offset is not None and not 0 <= self.moe_offset < self.moe_every:
            raise ConfigError("moe.moe_offset", self.moe_offset, f"must be in [0, moe_every={self.moe_every})")
        _positive("moe.first_k_dense", self.first_k_dense, allow_zero=True)
        for i in self.dense_layers:
            _positive("moe.dense_layers", i, allow_zero=True)
        if self.router.top_k > self.num_experts:
            raise ConfigError(
                "moe.router.top_k", self.router.top_k,
                f"must be <= moe.num_experts={self.num_experts}; lower top_k or add experts",
            )
        r, E = self.router, self.num_experts
        if E % r.n_group:
            raise ConfigError("moe.router.n_group", r.n_group, f"must divide moe.num_experts={E}")
        if r.top_k > r.topk_groups * (E // r.n_group):
            raise ConfigError("moe.router.topk_group", r.topk_groups,
                              f"the kept groups hold {r.topk_groups * (E // r.n_group)} experts, fewer than "
                              f"router.top_k={r.top_k}; raise topk_group or lower top_k")
        if r.type == "expert_choice" and r.top_k * (r.capacity_factor or 1.0) > E:
            raise ConfigError("moe.router.top_k", r.top_k,
                              f"expert_choice gives each token top_k * capacity_factor = "
                              f"{r.top_k * (r.capacity_factor or 1.0)} experts on average, more than "
                              f"moe.num_experts={E}; lower router.top_k or router.capacity_factor")

    def _check_aoe_router(self) -> None:
        """Router options a router-free AoE layer cannot honour, each named."""
        r = self.router
        if r.type not in AOE_SELECTIONS:
            raise ConfigError("moe.router.type", r.type, f"AoE selects experts by their norms with one of "
                              f"{', '.join(AOE_SELECTIONS)}; set moe.router.type to one of them "
                              "(or moe.aoe.router_free=false to keep a router)")
        for name, bad, why in (("jitter_eps", r.jitter_eps > 0, "input jitter would make the scores and the "
                                "experts see different inputs"),
                               ("n_group", r.n_group > 1, "group-limited routing is DeepSeek's"),
                               ("hidden_dim", r.hidden_dim is not None, "AoE has no router to enlarge"),
                               ("softmax_order", r.type == "topk" and r.softmax_order == "softmax_then_topk"
                                and not r.norm_topk_prob, "AoE's gates are softmax over the K chosen norms "
                                "(Alg. 2); use topk_then_softmax or set norm_topk_prob=true")):
            if bad:
                raise ConfigError(f"moe.router.{name}", getattr(r, name), f"not available with moe.aoe "
                                  f"(router-free): {why}; remove it")

    @property
    def shared_ffn_dim(self) -> int:
        """Total width of the shared experts, run as one SwiGLU (equal to the sum of separate ones)."""
        per = self.shared_expert_ffn_dim if self.shared_expert_ffn_dim is not None else self.expert_ffn_dim
        return self.num_shared_experts * per

    def is_moe_layer(self, i: int) -> bool:
        offset = self.moe_every - 1 if self.moe_offset is None else self.moe_offset
        return i >= self.first_k_dense and i not in self.dense_layers and i % self.moe_every == offset


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 §2.1, V3 eqs. 1-11): queries through an optional
    low-rank latent, keys and values through one joint latent c_KV (kv_lora_rank) that is all the KV
    cache keeps, plus one decoupled RoPE key (qk_rope_head_dim) shared by every head."""

    kv_lora_rank: int = 512  # d_c
    q_lora_rank: int | None = 1536  # d'_c; None: a full-rank query projection (DeepSeek-V2-Lite)
    qk_nope_head_dim: int = 128  # d_h, the per-head query/key part without position
    qk_rope_head_dim: int = 64  # d_h^R, the decoupled RoPE part of each query and the shared key
    v_head_dim: int = 128
    # the released checkpoints store each RoPE part as interleaved (even, odd) pairs (HF
    # rope_interleave, always on for DeepSeek-V2); False: the half-split layout of Llama
    rope_interleave: bool = True
    latent_norm_eps: float = 1e-6  # the RMSNorms on c_Q and c_KV (HF builds them with the default eps)

    def __post_init__(self) -> None:
        _positive("attention.mla.kv_lora_rank", self.kv_lora_rank)
        if self.q_lora_rank is not None:
            _positive("attention.mla.q_lora_rank", self.q_lora_rank)
        _positive("attention.mla.qk_nope_head_dim", self.qk_nope_head_dim, allow_zero=True)
        _positive("attention.mla.qk_rope_head_dim", self.qk_rope_head_dim)
        if self.qk_rope_head_dim % 2:
            raise ConfigError("attention.mla.qk_rope_head_dim", self.qk_rope_head_dim, "must be even for RoPE")
        _positive("attention.mla.v_head_dim", self.v_head_dim)
        _positive("attention.mla.latent_norm_eps", self.latent_norm_eps)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class YaRNConfig:
    """YaRN RoPE scaling (Peng et al. 2023) as transformers' ``_compute_yarn_parameters`` computes it:
    frequencies blended between interpolated (/factor) and original by a linear ramp over the
    dimensions whose wavelength lies between beta_fast and beta_slow rotations of the original
    context; cos and sin multiplied by the attention factor. MLA also multiplies its softmax scale by
    mscale(factor, mscale_all_dim)^2 (DeepSeek's rule)."""

    factor: float | None = None  # required: the context extension ratio (DeepSeek-V2/V3: 40)
    original_max_len: int | None = None  # required: the pretraining context, HF original_max_position_embeddings
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # None: mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    truncate: bool = True  # round the ramp's ends to whole dimensions (HF default)

    def __post_init__(self) -> None:
        for name in ("factor", "original_max_len"):
            if getattr(self, name) is None:
                raise ConfigError(f"attention.yarn.{name}", None, "is required for YaRN (DeepSeek-V2/V3: factor 40, "
                                  "original_max_len 4096)")
        _positive("attention.yarn.factor", self.factor)
        _positive("attention.yarn.original_max_len", self.original_max_len)
        for name in ("beta_fast", "beta_slow"):
            _positive(f"attention.yarn.{name}", getattr(self, name))
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"attention.yarn.{name}", getattr(self, name), "must be >= 0")
        if self.attention_factor is not None:
            _positive("attention.yarn.attention_factor", self.attention_factor)

    @staticmethod
    def mscale_of(scale: float, m: float = 1.0) -> float:
        """YaRN's 0.1 m ln(s) + 1 (1 for s <= 1)."""
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    def cos_sin_factor(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.mscale_of(self.factor, self.mscale) / self.mscale_of(self.factor, self.mscale_all_dim)
        return self.mscale_of(self.factor)

    def softmax_factor(self) -> float:
        """Multiplier of MLA's softmax scale: mscale(factor, mscale_all_dim)^2, 1 when mscale_all_dim is 0."""
        if not self.mscale_all_dim:
            return 1.0
        return self.mscale_of(self.factor, self.mscale_all_dim) ** 2


@dataclass
class AttentionConfig:
    """Causal self-attention: MHA (kv_heads == heads), GQA, MQA (kv_heads == 1), sliding window, or
    multi-head latent attention (``mla``)."""

    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads (MHA)
    head_dim: int | None = None  # None: d_model // num_heads
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # a token sees itself and the previous sliding_window - 1 tokens
    # The layers whose attention slides (Qwen2-MoE's layer_types), the others attend fully; None: every
    # layer slides when sliding_window is set. MTP blocks are layers num_layers, num_layers + 1, ...
    window_layers: tuple[int, ...] | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str = "none"  # "per_head" (Qwen3: RMSNorm over head_dim) or "full" (OLMoE: over all heads)
    clip_qkv: float | None = None  # DBRX/OLMoE: clamp q, k, v to [-c, c]
    logit_softcap: float | None = None  # Grok-1: scores = c * tanh(scores / c)
    # RoPE variant: "default" (plain RoPE) or "longrope" (Ding et al. 2024, LongRoPE; Phi-3 / Phi-3.5-MoE):
    # frequency i is divided by a per-dimension factor, cos and sin are multiplied by an mscale. The
    # rope_* fields below are used by longrope only; each factor list holds head_dim / 2 numbers.
    rope_type: str = "default"
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    # cos/sin multiplier when the sequence is <= / > rope_original_max_len; None: the LongRoPE default
    # sqrt(1 + ln(s) / ln(rope_original_max_len)), s = max_seq_len / rope_original_max_len (1.0 if s <= 1).
    rope_short_mscale: float | None = None
    rope_long_mscale: float | None = None
    rope_original_max_len: int | None = None  # the pretraining context (HF original_max_position_embeddings)
    yarn: YaRNConfig | None = None  # rope_type "yarn" only
    mla: MLAConfig | None = None  # multi-head latent attention instead of MHA/GQA

    def __post_init__(self) -> None:
        if isinstance(self.yarn, dict):
            self.yarn = _from_dict(YaRNConfig, self.yarn, "attention.yarn")
        if isinstance(self.mla, dict):
            self.mla = _from_dict(MLAConfig, self.mla, "attention.mla")
        _positive("attention.num_heads", self.num_heads)
        if self.num_kv_heads is not None:
            _positive("attention.num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ConfigError(
                    "attention.num_kv_heads", self.num_kv_heads,
                    f"must divide attention.num_heads={self.num_heads} (GQA groups heads evenly)",
                )
        if self.head_dim is not None:
            _positive("attention.head_dim", self.head_dim)
            if self.head_dim % 2:
                raise ConfigError("attention.head_dim", self.head_dim, "must be even for RoPE")
        _positive("attention.rope_theta", self.rope_theta)
        if self.sliding_window is not None:
            _positive("attention.sliding_window", self.sliding_window)
        if self.window_layers is not None:
            self._validate_window_layers()
        _choice("attention.qk_norm", self.qk_norm, QK_NORM_TYPES)
        if self.clip_qkv is not None:
            _positive("attention.clip_qkv", self.clip_qkv)
        if self.logit_softcap is not None:
            _positive("attention.logit_softcap", self.logit_softcap)
        self._validate_rope_scaling()
        if self.mla is not None:
            self._validate_mla()

    def _validate_window_layers(self) -> None:
        w = self.window_layers
        if not isinstance(w, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in w):
            raise ConfigError("attention.window_layers", w, "must be a list of layer indices >= 0")
        if self.sliding_window is None:
            raise ConfigError("attention.window_layers", w, "needs attention.sliding_window (the window those "
                              "layers use); set it, or remove window_layers for full attention everywhere")
        if not w:
            raise ConfigError("attention.window_layers", w, "lists no layer; remove attention.sliding_window and "
                              "attention.window_layers for full attention everywhere")
        if len(set(w)) != len(w):
            raise ConfigError("attention.window_layers", w, "lists a layer twice; list each sliding layer once")
        self.window_layers = tuple(sorted(w))

    def _validate_mla(self) -> None:
        if self.num_kv_heads not in (None, self.num_heads):
            raise ConfigError("attention.num_kv_heads", self.num_kv_heads,
                              "MLA has one key and value per head (leave num_kv_heads unset with attention.mla)")
        for name, off in (("head_dim", None), ("sliding_window", None), ("clip_qkv", None), ("logit_softcap", None),
                          ("qk_norm", "none")):
            if getattr(self, name) != off:
                raise ConfigError(f"attention.{name}", getattr(self, name),
                                  "is not used by multi-head latent attention; remove it or remove attention.mla")

    def _validate_rope_scaling(self) -> None:
        _choice("attention.rope_type", self.rope_type, ROPE_TYPES)
        if (self.rope_type == "yarn") != (self.yarn is not None):
            raise ConfigError("attention.yarn", self.yarn,
                              "set attention.yarn exactly when attention.rope_type is 'yarn'")
        for name in ("rope_short_factor", "rope_long_factor"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or any(
                    isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in value):
                raise ConfigError(f"attention.{name}", value, "must be a list of positive numbers")
            setattr(self, name, tuple(float(f) for f in value))
        for name in ("rope_short_mscale", "rope_long_mscale", "rope_original_max_len"):
            if getattr(self, name) is not None:
                _positive(f"attention.{name}", getattr(self, name))
        longrope_fields = ("rope_short_factor", "rope_long_factor", "rope_short_mscale", "rope_long_mscale",
                           "rope_original_max_len")
        if self.rope_type in ("default", "yarn"):
            for name in longrope_fields:
                if getattr(self, name) not in (None, ()):
                    raise ConfigError(f"attention.{name}", getattr(self, name),
                                      "is used only with attention.rope_type=longrope; set rope_type or remove it")
            return
        for name in ("rope_short_factor", "rope_long_factor"):
            if not getattr(self, name):
                raise ConfigError(f"attention.{name}", (), "rope_type=longrope needs head_dim / 2 factors")
        if self.rope_original_max_len is None or self.rope_original_max_len < 2:
            raise ConfigError("attention.rope_original_max_len", self.rope_original_max_len,
                              "rope_type=longrope needs the pretraining context length >= 2 (HF "
                              "original_max_position_embeddings)")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3 §2.2, eqs. 21-25): D sequential modules; module k combines
    the previous depth's hidden state at position i with the embedding of token i+k through its own
    projection and transformer block and predicts token i+k+1 with the shared output head.
    L_MTP = (lambda / D) sum_k L_k, added to the LM loss."""

    num_modules: int = 1  # D (DeepSeek-V3: 1)
    loss_weight: float = 0.3  # lambda (DeepSeek-V3: 0.3 for the first 10T of 14.8T tokens ...)
    final_loss_weight: float | None = None  # ... then 0.1; None keeps loss_weight throughout
    switch_fraction: float = 0.68  # share of the training steps after which final_loss_weight applies

    def __post_init__(self) -> None:
        _positive("mtp.num_modules", self.num_modules)
        if self.loss_weight < 0:
            raise ConfigError("mtp.loss_weight", self.loss_weight, "must be >= 0")
        if self.final_loss_weight is not None and self.final_loss_weight < 0:
            raise ConfigError("mtp.final_loss_weight", self.final_loss_weight, "must be >= 0")
        if not 0 <= self.switch_fraction <= 1:
            raise ConfigError("mtp.switch_fraction", self.switch_fraction, "must be in [0, 1]")

    def weight_at(self, step: int, total_steps: int) -> float:
        """lambda for optimizer step ``step`` (0-based) of ``total_steps``."""
        if self.final_loss_weight is None or step < self.switch_fraction * total_steps:
            return self.loss_weight
        return self.final_loss_weight


@dataclass
class ModelConfig:
    """A decoder-only transformer whose FFNs may be MoE layers (``moe=None``: fully dense)."""

    vocab_size: int = 4096
    d_model: int = 256
    num_layers: int = 4
    max_seq_len: int = 2048
    dense_ffn_dim: int = 1024  # SwiGLU width of the dense FFN layers
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only: Phi-3.5-MoE has a bias, DBRX has none
    sandwich_norm: bool = False  # Grok-1: extra norms on the attention and FFN outputs
    activation: str = "silu"  # gated FFN: act(x W_gate) * (x W_up)
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    embedding_multiplier: float = 1.0  # Grok-1 scales the embeddings
    output_multiplier: float = 1.0  # Grok-1 scales the logits
    init_std: float = 0.02
    # torch.utils.checkpoint around every block in training: recompute activations in backward.
    activation_checkpointing: bool = False
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    mtp: MTPConfig | None = None  # DeepSeek-V3 multi-token prediction modules (training; drafts for decoding)

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):
            self.attention = _from_dict(AttentionConfig, self.attention, "attention")
        if isinstance(self.moe, dict):
            self.moe = _from_dict(MoEConfig, self.moe, "moe")
        if isinstance(self.mtp, dict):
            self.mtp = _from_dict(MTPConfig, self.mtp, "mtp")
        for name in ("vocab_size", "d_model", "num_layers", "max_seq_len", "dense_ffn_dim"):
            _positive(name, getattr(self, name))
        biggest = max(self.vocab_size, self.dense_ffn_dim, 3 * self.attention.num_heads * (self.attention.head_dim or 1),
                      (self.moe.num_experts * self.moe.expert_ffn_dim) if self.moe is not None else 0) * self.d_model
        if biggest >= 2**62:
            raise ConfigError("d_model", self.d_model, f"with these sizes one weight would hold {biggest:.3g} values, "
                              "more than a tensor can; shrink the model")
        _choice("norm", self.norm, NORM_TYPES)
        _positive("norm_eps", self.norm_eps)
        _choice("activation", self.activation, ACTIVATIONS)
        _positive("init_std", self.init_std)
        window = self.attention.sliding_window
        if window is not None and window > self.max_seq_len:
            raise ConfigError("attention.sliding_window", window,
                              f"is larger than the context (max_seq_len={self.max_seq_len}), so it never limits "
                              "attention; remove it (full attention) or use a window <= max_seq_len")
        if self.attention.mla is None and self.attention.head_dim is None and self.d_model % self.attention.num_heads:
            raise ConfigError(
                "attention.num_heads", self.attention.num_heads,
                f"must divide d_model={self.d_model}, or set attention.head_dim explicitly",
            )
        if self.attention.mla is None and self.head_dim % 2:
            raise ConfigError("attention.head_dim", self.head_dim, "d_model / num_heads must be even for RoPE")
        if self.attention.rope_type == "longrope":
            for name in ("rope_short_factor", "rope_long_factor"):
                n = len(getattr(self.attention, name))
                if n != self.rope_dim // 2:
                    raise ConfigError(f"attention.{name}", f"{n} factors",
                                      f"needs head_dim / 2 = {self.rope_dim // 2} factors (one per RoPE frequency)")
        if self.attention.window_layers is not None:
            n_mtp = self.mtp.num_modules if self.mtp is not None else 0
            for i in self.attention.window_layers:
                if i >= self.num_layers + n_mtp:
                    bound = f"num_layers={self.num_layers}" + (f" + mtp.num_modules={n_mtp}" if n_mtp else "")
                    raise ConfigError("attention.window_layers", i, f"layer index must be < {bound}")
        if self.moe is not None and self.moe.aoe is not None and self.moe.aoe.d_low >= self.d_model:
            raise ConfigError("moe.aoe.d_low", self.moe.aoe.d_low,
                              f"must be < d_model={self.d_model} (W_g = W_down W_up is a low-rank factorisation; "
                              f"the paper uses about d_model / 3)")
        if self.moe is not None:
            for i in self.moe.dense_layers:
                if i >= self.num_layers:
                    raise ConfigError("moe.dense_layers", i, f"layer index must be < num_layers={self.num_layers}")
            if not any(self.moe.is_moe_layer(i) for i in range(self.num_layers)):
                raise ConfigError(
                    "moe", "no MoE layer",
                    "first_k_dense / moe_every / dense_layers leave no MoE layer; set moe: null for a dense model",
                )

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.num_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: head_dim, or MLA's decoupled qk_rope_head_dim."""
        mla = self.attention.mla
        return self.head_dim if mla is None else mla.qk_rope_head_dim

    def kv_cache_values_per_token(self) -> int:
        """Numbers the KV cache keeps per token, summed over layers: 2 * kv_heads * head_dim per layer
        for MHA / GQA / MQA, kv_lora_rank + qk_rope_head_dim for MLA (DeepSeek-V2 Table 1)."""
        mla = self.attention.mla
        per_layer = (mla.kv_lora_rank + mla.qk_rope_head_dim) if mla else 2 * self.attention.kv_heads * self.head_dim
        return per_layer * self.num_layers

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes per token at a given element size (2: bf16/fp16, 4: fp32); MTP modules excluded."""
        return self.kv_cache_values_per_token() * dtype_bytes

    def attention_kind(self) -> str:
        """'MLA', 'MHA', 'MQA' or 'GQA'."""
        a = self.attention
        if a.mla is not None:
            return "MLA"
        return "MHA" if a.kv_heads == a.num_heads else "MQA" if a.kv_heads == 1 else "GQA"

    @property
    def aoe_d_wide(self) -> int | None:
        """The AoE experts' d_wide (given, or eq. 5 from expert_ffn_dim); None without AoE."""
        if self.moe is None or self.moe.aoe is None:
            return None
        a = self.moe.aoe
        return a.d_wide if a.d_wide is not None else aoe_d_wide(self.d_model, self.moe.expert_ffn_dim, a.d_low)

    def rope_mscales(self) -> tuple[float, float]:
        """LongRoPE's (short, long) cos/sin multipliers, the unset ones at the LongRoPE default
        sqrt(1 + ln(s) / ln(L)), s = max_seq_len / L, L = rope_original_max_len (as HF's
        ``_compute_longrope_parameters`` attention factor). (1.0, 1.0) for plain RoPE."""
        a = self.attention
        if a.rope_type != "longrope":
            return 1.0, 1.0
        s = self.max_seq_len / a.rope_original_max_len
        default = math.sqrt(1 + math.log(s) / math.log(a.rope_original_max_len)) if s > 1.0 else 1.0
        return (default if a.rope_short_mscale is None else a.rope_short_mscale,
                default if a.rope_long_mscale is None else a.rope_long_mscale)

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i's attention (None: full attention): attention.sliding_window on
        the layers in attention.window_layers, or on every layer when that is None."""
        a = self.attention
        if a.window_layers is not None and i not in a.window_layers:
            return None
        return a.sliding_window

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(i)

    def layer_types(self) -> list[str]:
        """'moe' or 'dense' for every block, in order."""
        return ["moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_layers)]

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data, "")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside ``X`` or ``X | None``, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the field's type hint (int, float, bool, str, ``X | None``,
    ``tuple[X, ...]``, ``Literal``); a mismatch is a ConfigError naming the field, so a wrong type in
    a config file never reaches torch. ints are accepted for floats; bools are not ints here."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(name, value, f"must be {_describe(hint)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(name, value, f"must be one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, value, f"must be a list ({_describe(hint)})")
        item = args[0] if args else Any
        return tuple(_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, "must be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(name, value, "must be an integer")
        return value
    if hint in (bool, str):
        if not isinstance(value, hint):
            raise ConfigError(name, value, f"must be {_TYPE_WORDS[hint]}")
        return value
    return value


def _describe(hint: Any) -> str:
    if hint in _TYPE_WORDS:
        return _TYPE_WORDS[hint]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(_describe(a) for a in args) or str(hint)


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain dict, recursing into nested configs; unknown keys raise."""
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(where, type(data).__name__, "expected a mapping of field names to values")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix + '.' if prefix else ''}{unknown[0]}", data[unknown[0]],
            f"unknown field of {cls.__name__}; known fields: {', '.join(sorted(names))}",
        )
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix + '.' if prefix else ''}{key}"
        sub = _dataclass_type(hints[key])
        if sub is not None and isinstance(value, dict):
            value = _from_dict(sub, value, name)
        elif sub is not None and not dataclasses.is_dataclass(value):
            optional = type(None) in typing.get_args(hints[key])
            if not (value is None and optional):
                raise ConfigError(name, value, f"must be a mapping of {sub.__name__} fields" + (" or null" if optional
                                                                                               else ""))
        elif sub is None:
            value = _coerce(name, value, hints[key])
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - names already checked above
        raise ConfigError(where, data, str(e)) from e


def save_config(config: ModelConfig, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
    path = Path(path)
    data = config.to_dict()
    if path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    write_atomic(path, text)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read a moelab config written by :func:`save_config` (YAML or JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file", str(path), "file not found; pass a moelab config .yaml/.json")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError("config file", str(path), f"could not be parsed: {e}") from e
    if isinstance(data, dict) and "model" in data and "vocab_size" not in data:
        data = data["model"]  # a run config (train settings + model) is accepted too
    return ModelConfig.from_dict(data)
