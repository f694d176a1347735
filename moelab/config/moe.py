"""MoEConfig (the expert layer and where it sits in the stack) and AoEConfig (Autonomy-of-Experts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moelab.config.checks import check_choice, check_positive
from moelab.config.coerce import from_dict
from moelab.config.router import RouterConfig
from moelab.errors import ConfigError

AOE_NORMS = ("l2", "l1", "linf")
# Selection rules AoE can run on its norm scores (AoE paper Alg. 2 top-k; Table 3 top-p, expert choice).
AOE_SELECTIONS = ("topk", "top_p", "expert_choice")


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
        check_positive("moe.aoe.d_low", self.d_low)
        if self.d_wide is not None:
            check_positive("moe.aoe.d_wide", self.d_wide)
        check_choice("moe.aoe.norm", self.norm, AOE_NORMS)


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
            self.router = from_dict(RouterConfig, self.router, "moe.router")
        if isinstance(self.aoe, dict):
            self.aoe = from_dict(AoEConfig, self.aoe, "moe.aoe")
        if self.aoe is not None and self.aoe.router_free:
            self._check_aoe_router()
        self.dense_layers = tuple(self.dense_layers)
        check_positive("moe.num_experts", self.num_experts)
        check_positive("moe.expert_ffn_dim", self.expert_ffn_dim)
        check_positive("moe.num_shared_experts", self.num_shared_experts, allow_zero=True)
        if self.shared_expert_ffn_dim is not None:
            check_positive("moe.shared_expert_ffn_dim", self.shared_expert_ffn_dim)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ConfigError("moe.shared_expert_gate", True, "needs moe.num_shared_experts >= 1")
        check_positive("moe.moe_every", self.moe_every)
        if self.moe_offset is not None and not 0 <= self.moe_offset < self.moe_every:
            raise ConfigError("moe.moe_offset", self.moe_offset, f"must be in [0, moe_every={self.moe_every})")
        check_positive("moe.first_k_dense", self.first_k_dense, allow_zero=True)
        for i in self.dense_layers:
            check_positive("moe.dense_layers", i, allow_zero=True)
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
