"""DeepSeek-V2 and DeepSeek-V3 routing.

DeepSeek-V2 (arXiv 2405.04434 §2.2): s = softmax(logits) over E; device-limited routing picks the
``topk_group`` groups (devices) with the highest **max** affinity (``group_score`` default "max",
DeepSeek's V2 code), then top-K among their experts;
gate g = s (not renormalised unless ``norm_topk_prob``) x ``routed_scaling_factor`` (16.0 for 236B).

DeepSeek-V3 (arXiv 2412.19437 §2.1.2, eq. 12-16): s = sigmoid(logits); selection is top-K over s + b
where b is the aux-loss-free bias (selection only: it never enters the gates); node-limited routing
scores each group by the **sum of its top-2** of s + b (``group_score`` default "sum_top2": DeepSeek's
released code and transformers hard-code 2) and keeps ``topk_group`` groups, masking the
others with -inf (s + b can be negative, so HF's 0.0 mask is wrong); gate g_i = s_i / sum_selected s
(``norm_topk_prob`` None means True here) x ``routed_scaling_factor`` (2.5). Balance losses see
s normalised over all experts (eq. 19) as ``probs_TE``.

The V3 paper's own rule scores a node by "the sum of the highest K_r/M affinity scores" of its
experts (K_r routed experts per token, M nodes per token); 2 = K_r/M only for V3's 8/4. Set
``group_score="sum_top_k_over_m"`` for the paper's rule at other K, M (K/M = 1 is the group max).

Aux-loss-free balancing (Wang et al. 2024; V3 §2.1.2): after each optimizer step,
b_i += gamma * sign(mean(c) - c_i) with c the load counted over the whole step
(``bias_update_rate`` = gamma, default 0.001 as in V3). b is an fp32 persistent buffer named
``e_score_correction_bias`` (HF's name), saved in checkpoints and kept fp32 by ``model.to(bf16)``.

Shape legend: T tokens, E experts, K top-k, G groups, N experts per group.
"""

from __future__ import annotations

import torch

from moelab.config import RouterConfig
from moelab.moe.routers.base import Router, register_router
from moelab.moe.routing import Routing


def group_score_width(score: str, top_k: int, topk_group: int) -> int:
    """How many of a group's best entries its score sums: 1 for "max", 2 for "sum_top2", and
    top_k // topk_group (at least 1) for "sum_top_k_over_m", the V3 paper's K_r / M."""
    if score == "max":
        return 1
    if score == "sum_top2":
        return 2
    if score == "sum_top_k_over_m":
        return max(1, top_k // topk_group)
    raise ValueError(f"unknown group score {score!r}")


def group_limited(select_TE: torch.Tensor, n_group: int, topk_group: int, width: int) -> torch.Tensor:
    """``select_TE`` with the experts outside each token's best ``topk_group`` groups set to -inf.
    A group's score is the sum of its ``width`` largest entries (width 1: its max, as in V2)."""
    if topk_group >= n_group:
        return select_TE
    T, E = select_TE.shape
    N = E // n_group
    grouped_TGN = select_TE.view(T, n_group, N)
    if width == 1:
        group_score_TG = grouped_TGN.amax(dim=-1)
    else:
        group_score_TG = grouped_TGN.topk(min(width, N), dim=-1).values.sum(dim=-1)
    keep_idx = group_score_TG.topk(topk_group, dim=-1).indices  # (T, topk_group)
    keep_TG = torch.zeros(T, n_group, dtype=torch.bool, device=select_TE.device).scatter(-1, keep_idx, True)
    keep_TE = keep_TG.repeat_interleave(N, dim=-1)
    return select_TE.masked_fill(~keep_TE, float("-inf"))


@register_router("deepseek_v2")
class DeepSeekV2Router(Router):
    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        logits_TE = self.logits(x_TD)  # (T, E) fp32
        probs_TE = logits_TE.softmax(dim=-1)
        width = group_score_width(cfg.effective_group_score, cfg.top_k, cfg.topk_groups)
        select_TE = group_limited(probs_TE.detach(), cfg.n_group, cfg.topk_groups, width)
        topk_idx_TK = select_TE.topk(cfg.top_k, dim=-1).indices
        weight_TK = probs_TE.gather(-1, topk_idx_TK)
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return Routing.from_topk(topk_idx_TK, weight_TK * cfg.routed_scaling_factor, logits_TE, probs_TE)


@register_router("deepseek_v3")
class DeepSeekV3Router(Router):
    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int, gate: bool = True):
        super().__init__(cfg, d_model, num_experts, gate=gate)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # NOTE: keep the bias fp32 through model.to(bf16): gamma = 1e-3 steps vanish in bf16.
        bias = self.e_score_correction_bias
        out = super()._apply(fn, recurse)
        moved = self._buffers["e_score_correction_bias"]
        if moved.dtype != torch.float32:
            self._buffers["e_score_correction_bias"] = bias.to(device=moved.device, dtype=torch.float32)
        return out

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        logits_TE = self.logits(x_TD)  # (T, E) fp32
        scores_TE = torch.sigmoid(logits_TE)
        biased_TE = scores_TE.detach() + self.e_score_correction_bias.float()  # selection only
        width = group_score_width(cfg.effective_group_score, cfg.top_k, cfg.topk_groups)
        select_TE = group_limited(biased_TE, cfg.n_group, cfg.topk_groups, width)
        topk_idx_TK = select_TE.topk(cfg.top_k, dim=-1).indices
        weight_TK = scores_TE.gather(-1, topk_idx_TK)  # gates from the original s
        if cfg.norm_topk_prob is None or cfg.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        routing = Routing.from_topk(topk_idx_TK, weight_TK * cfg.routed_scaling_factor, logits_TE,
                                    scores_TE / scores_TE.sum(dim=-1, keepdim=True))
        routing.scores_TE = scores_TE
        return routing

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """b += gamma * sign(mean(load) - load): overloaded experts become less likely to be picked."""
        rate = self.cfg.effective_bias_update_rate
        if rate > 0:
            load_E = load_E.float().to(self.e_score_correction_bias.device)
            self.e_score_correction_bias += rate * torch.sign(load_E.mean() - load_E)
