"""Token-choice softmax top-k routing (Shazeer 2017 without noise, GShard, Switch, Mixtral, Qwen-MoE).

Two standard forms, selected by ``RouterConfig.softmax_order``:
- ``topk_then_softmax`` (Mixtral, Jiang et al. 2024): gates = softmax(TopK(logits)) over the K chosen.
- ``softmax_then_topk`` (Switch/GShard/Qwen/DeepSeekMoE): p = softmax(logits) over E, gates = TopK(p),
  renormalised to sum 1 only if ``norm_topk_prob`` (Qwen3, DBRX's L1 norm); otherwise they sum to < 1.
The two forms give the same gates when the second renormalises: exp(l_i)/sum_K exp(l_j) = p_i/sum_K p_j.
"""

from __future__ import annotations

import torch

from moelab.moe.balancing import router_z_loss, switch_load_balance_loss
from moelab.moe.routing import Router, Routing, register_router


@register_router("topk")
class TopKRouter(Router):
    def forward(self, x_TD: torch.Tensor) -> Routing:
        K = self.cfg.top_k
        logits_TE = self.logits(x_TD)  # (T, E) fp32
        probs_TE = logits_TE.softmax(dim=-1)
        if self.cfg.softmax_order == "topk_then_softmax":
            top_logits_TK, topk_idx_TK = logits_TE.topk(K, dim=-1)
            weight_TK = top_logits_TK.softmax(dim=-1)
        else:
            weight_TK, topk_idx_TK = probs_TE.topk(K, dim=-1)
            if self.cfg.norm_topk_prob:
                weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return Routing.from_topk(topk_idx_TK, weight_TK, logits_TE, probs_TE)


@register_router("switch")
class SwitchRouter(Router):
    """Switch Transformer top-1 (Fedus et al. 2021 §2.1): p = softmax(logits) over E, the token goes
    to argmax p with gate p_i* (kept, not renormalised to 1, so the router gets a gradient)."""

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)  # (T, E) fp32
        probs_TE = logits_TE.softmax(dim=-1)
        weight_T1, idx_T1 = probs_TE.max(dim=-1, keepdim=True)
        return Routing.from_topk(idx_T1, weight_T1, logits_TE, probs_TE)


def add_standard_losses(router: Router, routing: Routing) -> None:
    """Switch load-balance and ST-MoE z-loss, each times its coefficient, when the coefficient > 0.
    Routers need not call this: the MoE layer adds every configured loss
    (:func:`moelab.moe.balancing.add_aux_losses`) and keeps the ones already present."""
    cfg = router.cfg
    if cfg.load_balance_coef > 0:
        routing.aux_losses["load_balance"] = cfg.load_balance_coef * switch_load_balance_loss(
            routing.probs_TE, routing.expert_idx_A)
    if cfg.z_loss_coef > 0:
        routing.aux_losses["z_loss"] = cfg.z_loss_coef * router_z_loss(routing.logits_TE)
