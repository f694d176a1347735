"""RouterConfig: how tokens pick experts, and the balancing each router family's paper trains with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moelab.config.checks import check_choice, check_positive
from moelab.errors import ConfigError

# Router families moelab knows; moelab.moe.routers.ROUTERS must hold exactly these names.
ROUTER_TYPES = ("topk", "sparsemixer", "switch", "noisy_topk", "expert_choice", "top_p", "deepseek_v2", "deepseek_v3")
DROP_PRIORITIES = ("position", "position_global", "score")
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
SOFTMAX_ORDERS = ("topk_then_softmax", "softmax_then_topk")


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
    # Share of the training steps after which the bias stops moving (gamma = 0 from then on), as V3
    # trains: gamma 0.001 for the first 14.3T of 14.8T tokens, then 0 (0.966). None: it moves throughout.
    bias_update_stop_fraction: float | None = None
    # Dynamic top-p threshold p (top_p router); 0.4 in Huang et al.'s code.
    top_p: float = 0.4
    # Capacity per expert = ceil(capacity_factor * tokens * top_k / E); None = dropless (token
    # choice). Expert choice always uses it (None means 1.0). ST-MoE: 1.25 train / 2.0 eval.
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None  # in eval mode; None = dropless
    # Which assignments an over-full expert keeps. All give every token's 1st choice priority over
    # any 2nd choice (GShard Alg. 1); within a choice rank "position" keeps tokens in the flattened
    # batch order, sequence by sequence (OpenMoE's Top2Router, flaxformer), "position_global" position
    # 0 of every sequence, then position 1 of every sequence ... (so drops rise toward the end of every
    # sequence by construction), "score" higher top gates first (batch-prioritised routing, Riquelme
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
        check_choice("router.type", self.type, ROUTER_TYPES)
        check_positive("router.top_k", self.top_k)
        check_choice("router.softmax_order", self.softmax_order, SOFTMAX_ORDERS)
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ConfigError("router.jitter_eps", self.jitter_eps, "must be in [0, 1)")
        check_positive("router.temperature", self.temperature)
        check_positive("router.sparsemixer_eps", self.sparsemixer_eps, allow_zero=True)
        for name in (*LOSS_FIELDS.values(), "bias_update_rate"):
            if getattr(self, name) is not None:
                check_positive(f"router.{name}", getattr(self, name), allow_zero=True)
        check_positive("router.noise_epsilon", self.noise_epsilon, allow_zero=True)
        check_positive("router.topk_norm_p", self.topk_norm_p)
        if self.hidden_dim is not None:
            check_positive("router.hidden_dim", self.hidden_dim)
        if self.group_score is not None:
            check_choice("router.group_score", self.group_score, GROUP_SCORES)
            if self.type not in ("deepseek_v2", "deepseek_v3"):
                raise ConfigError("router.group_score", self.group_score,
                                  "group scores apply to group-limited routing: router.type deepseek_v2 or deepseek_v3")
        check_positive("router.routed_scaling_factor", self.routed_scaling_factor)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("router.top_p", self.top_p, "must be in (0, 1]")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) is not None:
                check_positive(f"router.{name}", getattr(self, name))
        check_choice("router.drop_priority", self.drop_priority, DROP_PRIORITIES)
        if self.balance_scope is not None:
            check_choice("router.balance_scope", self.balance_scope, BALANCE_SCOPES)
        check_choice("router.expert_choice_eval", self.expert_choice_eval, EXPERT_CHOICE_EVAL)
        check_positive("router.n_group", self.n_group)
        if self.topk_group is not None:
            check_positive("router.topk_group", self.topk_group)
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
        if self.bias_update_stop_fraction is not None:
            if not 0.0 <= self.bias_update_stop_fraction <= 1.0:
                raise ConfigError("router.bias_update_stop_fraction", self.bias_update_stop_fraction,
                                  "must be in [0, 1] (a share of the training steps)")
            if self.type != "deepseek_v3":
                raise ConfigError("router.bias_update_stop_fraction", self.bias_update_stop_fraction,
                                  "the aux-free bias exists only for router.type=deepseek_v3")
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

    def bias_moves_at(self, step: int, total_steps: int | None) -> bool:
        """Whether the aux-free bias is updated after optimizer step ``step`` (0-based) of ``total_steps``."""
        stop = self.bias_update_stop_fraction
        if stop is not None and total_steps is None:
            raise ConfigError("router.bias_update_stop_fraction", stop,
                              "needs the run's total steps: call update_router_biases(model, step, total_steps)")
        return stop is None or step < stop * total_steps

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


def load_balance_coef_from_hf(hf_coef: float, top_k: int, num_moe_layers: int) -> float:
    """A ``router_aux_loss_coef`` of an HF config.json in moelab's convention. HF's
    ``load_balancing_loss_func`` is computed once over all layers' tokens and equals K at balance;
    moelab's Switch loss is per layer, equals 1 at balance, and is summed over layers. They are
    equal (and so are their gradients) when every layer routes alike, with
    coef_moelab = coef_hf * K / L_moe (Mixtral 8x7B: 0.02 * 2 / 32 = 0.00125)."""
    return hf_coef * top_k / max(num_moe_layers, 1)
