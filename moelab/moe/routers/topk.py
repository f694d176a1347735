"""Token-choice softmax top-k routing (Shazeer 2017 without noise, GShard, Switch, Mixtral, Qwen-MoE).

Two standard forms, selected by ``RouterConfig.softmax_order``:
- ``topk_then_softmax`` (Mixtral, Jiang et al. 2024): gates = softmax(TopK(logits)) over the K chosen.
- ``softmax_then_topk`` (Switch/GShard/Qwen/DeepSeekMoE): p = softmax(logits) over E, gates = TopK(p),
  renormalised only if ``norm_topk_prob``: divided by their sum (Qwen3), or by their p-norm with
  ``topk_norm_p`` = p (DBRX's ``moe_normalize_expert_weights``, any p > 0, as HF's ``torch.norm``);
  otherwise they sum to < 1.
The two forms give the same gates when the second renormalises: exp(l_i)/sum_K exp(l_j) = p_i/sum_K p_j.
"""

from __future__ import annotations

import torch

from moelab.moe.routers.base import Router, register_router
from moelab.moe.routing import Routing


@register_router("topk")
class TopKRouter(Router):
    def route(self, logits_TE: torch.Tensor) -> Routing:
        K = self.cfg.top_k
        probs_TE = logits_TE.softmax(dim=-1)
        if self.cfg.softmax_order == "topk_then_softmax":
            top_logits_TK, topk_idx_TK = logits_TE.topk(K, dim=-1)
            weight_TK = top_logits_TK.softmax(dim=-1)
        else:
            weight_TK, topk_idx_TK = probs_TE.topk(K, dim=-1)
            if self.cfg.norm_topk_prob:
                p = self.cfg.topk_norm_p
                norm_T1 = (weight_TK.sum(dim=-1, keepdim=True) if p == 1.0
                           else torch.linalg.vector_norm(weight_TK, ord=p, dim=-1, keepdim=True))
                weight_TK = weight_TK / norm_T1
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

