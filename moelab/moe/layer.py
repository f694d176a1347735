"""The MoE FFN: router + stacked routed experts + optional always-on shared experts.

y = sum_{e in routed(x)} g_e(x) E_e(x) + [sigmoid(x w_s)] * Shared(x)
(DeepSeekMoE eq. 9-11 shared experts; Qwen2-MoE adds the sigmoid gate on the shared output.)

With ``moe.aoe`` the experts are Autonomy-of-Experts experts (:mod:`moelab.moe.aoe`); router-free
(the default) the layer scores with the experts' own x W_down norms and the router is only the
selection rule (``Router.route``), so capacity, losses and metrics below are unchanged.

Per forward: route, add every configured balance loss (by coefficient, before dropping), apply the
train or eval capacity (``router.capacity_factor`` / ``router.eval_capacity_factor``), dispatch,
combine. The layer never branches on router type.

The layer owns its metrics (no globals). After every forward:
- ``last_counts_E``: assignments routed to each expert (before capacity dropping), (E,) long.
- ``last_metrics``: floats and small tensors, see :meth:`MoELayer._record`.
- ``load_accum_E``: load summed over training forwards since the last ``update_router_bias()``,
  which hands it to the router (DeepSeek-V3 bias) and resets it.
``record_stats = False`` turns all three off; activation checkpointing sets it while a block is
recomputed in backward so that nothing is counted twice.

Shape legend: B batch, T positions, D model dim, E experts, A assignments.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.config import ModelConfig
from moelab.layers.mlp import GatedMLP
from moelab.moe.aoe import AoEExperts, expert_norms
from moelab.moe.balancing import add_aux_losses
from moelab.moe.dispatch import capacity_keep_mask, dispatch_combine, expert_capacity
from moelab.moe.experts import StackedExperts
from moelab.moe.metrics import load_balance_metrics
from moelab.moe.routers import build_router
from moelab.moe.routing import Routing, TokenLayout


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.num_experts = moe.num_experts
        self.router_cfg = moe.router
        self.aoe = moe.aoe
        self.router_free = moe.aoe is not None and moe.aoe.router_free
        self.router = build_router(moe.router, cfg.d_model, moe.num_experts, gate=not self.router_free)
        if moe.aoe is not None:
            self.experts = AoEExperts(moe.num_experts, cfg.d_model, moe.aoe.d_low, cfg.aoe_d_wide, cfg.activation)
        else:
            self.experts = StackedExperts(moe.num_experts, cfg.d_model, moe.expert_ffn_dim, cfg.activation)
        self.shared = GatedMLP(cfg.d_model, moe.shared_ffn_dim, cfg.activation) if moe.num_shared_experts else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if moe.shared_expert_gate else None
        self.last_counts_E: torch.Tensor | None = None
        self._pending: tuple | None = None
        self._metrics: dict | None = None
        self.record_stats = True
        # expert-parallel ranks holding the experts (set by moelab.distributed); None: one device
        self.device_groups: int | None = None
        self.register_buffer("load_accum_E", torch.zeros(moe.num_experts, dtype=torch.long), persistent=False)

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for a forward of ``num_tokens`` tokens in the current mode; None = dropless."""
        cf = self.router_cfg.capacity_factor if self.training else self.router_cfg.eval_capacity_factor
        return None if cf is None else expert_capacity(cf, num_tokens, self.router_cfg.top_k, self.num_experts)

    def reset_extra_parameters(self) -> None:
        """Inits beyond the model's generic one (Shazeer's zero W_noise)."""
        self.router.reset_extra_parameters()

    def route(self, x_TD: torch.Tensor) -> Routing:
        """The router's choice, or (router-free AoE) the experts' own: C = x W_down for all experts
        in one matmul, scores = ||C_i||, selection by the router's rule, C kept for the experts."""
        if not self.router_free:
            return self.router(x_TD)
        c_TEL = self.experts.low_rank_all(x_TD)
        routing = self.router.route(expert_norms(c_TEL, self.aoe.norm) / self.router_cfg.temperature)
        routing.expert_cache_TEL = c_TEL
        return routing

    def active_expert_params(self) -> float:
        """Routed-expert parameters a token uses (for the active-parameter count)."""
        k = self.router.active_experts_per_token
        if hasattr(self.experts, "active_param_count"):  # AoE's experts (split over ranks or not)
            return self.experts.active_param_count(k, scores_all=self.router_free)
        return k * sum(p.numel() for p in self.experts.parameters()) // self.num_experts

    def forward(self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """``token_mask_BT`` (bool, True = real token): padded positions are not routed at all, so they
        take no capacity and count in no balance loss, load metric or bias update; their output is 0
        (the block's output there is its residual)."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        valid_T = None
        if token_mask_BT is not None and not bool(token_mask_BT.all()):
            valid_T = token_mask_BT.reshape(-1)
            layout = TokenLayout.from_mask(token_mask_BT)
            x_TD = x_TD[valid_T]  # (N, D), the real tokens, sequence-major
        else:
            layout = TokenLayout.dense(B, T, x_TD.device)
        routing = self.route(x_TD)
        add_aux_losses(self.router_cfg, routing, seq_len=layout, devices=self.device_groups)
        capacity = self.capacity(x_TD.shape[0])
        kept = routing
        if capacity is not None:
            routing.kept_A = capacity_keep_mask(routing, capacity, self.router_cfg.drop_priority, seq_len=layout)
            kept = routing.select(routing.kept_A)
        if hasattr(self.experts, "stats"):  # expert parallelism: a checkpointed recompute counts no rows, only time
            self.experts.stats.count_rows = self.record_stats
        out_TD = self.add_shared(x_TD, dispatch_combine(self.experts, x_TD, kept, capacity))
        if self.record_stats:
            self._record(routing, kept, layout, capacity)
        if valid_T is not None:
            out_TD = out_TD.new_zeros(B * T, D).index_put((valid_T.nonzero().squeeze(1),), out_TD)
        return out_TD.view(B, T, D), routing

    def add_shared(self, x_TD: torch.Tensor, routed_TD: torch.Tensor) -> torch.Tensor:
        """The routed output plus the always-on shared experts' (DeepSeekMoE eq. 9), with Qwen2-MoE's
        sigmoid gate on the shared output when configured."""
        if self.shared is None:
            return routed_TD
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return routed_TD + shared_TD

    @torch.no_grad()
    def _record(self, routing: Routing, kept: Routing, layout: TokenLayout, capacity: int | None) -> None:
        """Metrics of this forward (REFERENCES §11), over the routed (real) tokens only:
        tokens_per_expert (E,) and the load metrics of :func:`load_balance_metrics` (max_load_ratio,
        max_vio, cv, dead_expert_frac) on the routed load; dropped_frac (dropped / routed
        assignments); dropped_frac_by_position (longest sequence,); experts_per_token_{mean,min,max} (routed,
        before drops); no_expert_token_frac (tokens left with no expert after drops: expert choice,
        dropping); router_entropy (mean per-token entropy of probs_TE: AoE's confidence entropy
        Ent_conf, eq. 8); load_entropy (-sum_i f_i ln f_i of the routed load fractions f, summing to
        1: AoE's Ent_load, eq. 7, ln E at perfect balance); capacity (None = dropless)."""
        counts_E = routing.expert_counts()
        self.last_counts_E = counts_E
        if self.training:
            self.load_accum_E += counts_E
        # The rest is computed when first read (one device sync then), so decoding and evaluation
        # that never look at the metrics pay only for the counts.
        self._pending = (routing.token_idx_A, kept.token_idx_A, routing.kept_A, routing.probs_TE.detach(), counts_E,
                         routing.num_tokens, layout, capacity)
        self._metrics = None

    @property
    def last_metrics(self) -> dict:
        """The metrics of the last recorded forward (see :meth:`_record`); {} before any."""
        if self._metrics is None:
            self._metrics = {} if self._pending is None else self._compute_metrics(*self._pending)
        return self._metrics

    @staticmethod
    @torch.no_grad()
    def _compute_metrics(token_A, kept_token_A, kept_A, probs_TE, counts_E, T, layout, capacity) -> dict:
        per_token_T = torch.bincount(token_A, minlength=T).float()
        kept_per_token_T = torch.bincount(kept_token_A, minlength=T)
        seq_len = max(layout.max_len, 1)
        pos_A = layout.pos_T[token_A]
        routed_pos = torch.bincount(pos_A, minlength=seq_len).float()
        dropped_A = torch.zeros_like(pos_A, dtype=torch.bool) if kept_A is None else ~kept_A
        dropped_pos = torch.bincount(pos_A[dropped_A], minlength=seq_len).float()
        p = probs_TE.float()
        f_E = counts_E.float() / counts_E.sum().clamp_min(1)
        scalars = torch.stack([  # one device sync for all of them
            dropped_A.float().mean() if dropped_A.numel() else p.new_zeros(()),
            per_token_T.mean(), per_token_T.min(), per_token_T.max(),
            (kept_per_token_T == 0).float().mean(),
            -torch.special.xlogy(p, p).sum(-1).mean(),
            -torch.special.xlogy(f_E, f_E).sum(),
        ]).tolist()
        names = ("dropped_frac", "experts_per_token_mean", "experts_per_token_min", "experts_per_token_max",
                 "no_expert_token_frac", "router_entropy", "load_entropy")
        return {
            "tokens_per_expert": counts_E,
            **load_balance_metrics(counts_E),
            **dict(zip(names, scalars)),
            "dropped_frac_by_position": dropped_pos / routed_pos.clamp_min(1),
            "capacity": capacity,
        }

    @torch.no_grad()
    def update_router_bias(self, move: bool = True) -> None:
        """Give the router the load counted since the last call (then reset the counter). Called by
        :func:`update_router_biases` after each optimizer step; ``move=False`` only resets the counter
        (the bias is frozen, as for the end of DeepSeek-V3's training)."""
        if move:
            self.router.update_bias(self.load_accum_E)
        self.load_accum_E.zero_()


@torch.no_grad()
def update_router_biases(model: nn.Module, step: int | None = None, total_steps: int | None = None) -> int:
    """Call after every ``optimizer.step()``: each MoE layer hands the load it counted in training
    forwards since the last call to its router (DeepSeek-V3 aux-loss-free bias:
    b += gamma * sign(mean load - load)) and resets its counter. With ``step`` (0-based) and
    ``total_steps`` a router's ``bias_update_stop_fraction`` freezes its bias late in training.
    Returns the number of MoE layers."""
    n = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            move = step is None or module.router_cfg.bias_moves_at(step, total_steps)
            module.update_router_bias(move)
            n += 1
    return n
