"""DeepSeek-V2 and DeepSeek-V3 routing.

DeepSeek-V2 (arXiv 2405.04434 §2.2): s = softmax(logits) over E; device-limited routing picks the
``topk_group`` groups (devices) with the highest **max** affinity, then top-K among their experts;
gate g = s (not renormalised unless ``norm_topk_prob``) x ``routed_scaling_factor`` (16.0 for 236B).

DeepSeek-V3 (arXiv 2412.19437 §2.1.2, eq. 12-16): s = sigmoid(logits); selection is top-K over s + b
where b is the aux-loss-free bias (selection only: it never enters the gates); node-limited routing
scores each group by the **sum of its top-2** of s + b and keeps ``topk_group`` groups, masking the
others with -inf (s + b can be negative, so HF's 0.0 mask is wrong); gate g_i = s_i / sum_selected s
(``norm_topk_prob`` None means True here) x ``routed_scaling_factor`` (2.5). Balance losses see
s normalised over all experts (eq. 19) as ``probs_TE``.

Aux-loss-free balancing (Wang et al. 2024; V3 §2.1.2): after each optimizer step,
b_i += gamma * sign(mean(c) - c_i) with c the load counted over the whole step
(``bias_update_rate`` = gamma, 0.001 in V3). b is an fp32 persistent buffer named
``e_score_correction_bias`` (HF's name), saved in checkpoints and kept fp32 by ``model.to(bf16)``.

Shape legend: T tokens, E experts, K top-k, G groups, N experts per group.
"""

from __future__ import annotations

import torch

from moelab.config import RouterConfig
from moelab.moe.routing import Router, Routing, register_router


def group_limited(select_TE: torch.Tensor, n_group: int, topk_group: int, score: str) -> torch.Tensor:
    """``select_TE`` with the experts outside each token's best ``topk_group`` groups set to -inf.
    Group score: "max" (V2) or "top2_sum" (V3) of the group's entries."""
    if topk_group >= n_group:
        return select_TE
    T, E = select_TE.shape
    N = E // n_group
    grouped_TGN = select_TE.view(T, n_group, N)
    if score == "max":
        group_score_TG = grouped_TGN.amax(dim=-1)
    else:
        group_score_TG = grouped_TGN.topk(min(2, N), dim=-1).values.sum(dim=-1)
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
        select_TE = group_limited(probs_TE.detach(), cfg.n_group, cfg.topk_groups, "max")
        topk_idx_TK = select_TE.topk(cfg.top_k, dim=-1).indices
        weight_TK = probs_TE.gather(-1, topk_idx_TK)
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return Routing.from_topk(topk_idx_TK, weight_TK * cfg.routed_scaling_factor, logits_TE, probs_TE)


@register_router("deepseek_v3")
class DeepSeekV3Router(Router):
    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
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
        select_TE = group_limited(biased_TE, cfg.n_group, cfg.topk_groups, "top2_sum")
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
        if self.cfg.bias_update_rate > 0:
            load_E = load_E.float().to(self.e_score_correction_bias.device)
            self.e_score_correction_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
