"""SparseMixer routing (Liu et al. 2023, "Sparse Backpropagation for MoE Training", arXiv 2310.00811),
as used by Phi-3.5-MoE / GRIN (Liu et al. 2024, arXiv 2409.12136).

Experts are picked one after another. For pick k, the experts not yet picked are the candidates;
with m the largest candidate logit, a candidate i survives when (m - l_i) / max(|l_i|, m) <= 2 eps
(``RouterConfig.sparsemixer_eps``, HF's ``router_jitter_noise``, 0.01 for Phi-3.5). The gate of
the pick is its softmax probability over the survivors only.
- eval: the pick is the argmax (deterministic).
- training: the pick is sampled from the survivors' softmax (Gumbel-max), and the gradient reaching
  the logits is the SparseMixer estimate: forward value ``g * s`` with s = 1 when the pick is the
  survivors' argmax (or, otherwise, with probability 1/4) and s = 0.3333 else (the third-order
  Heun weights of the paper); backward d/dl_j = g * (1[j = pick] - p_j), as in HF modeling_phimoe.

Shape legend: T tokens, E experts, K picks.
"""

from __future__ import annotations

import torch

from moelab.moe.routers.base import Router, register_router
from moelab.moe.routing import Routing


class _SparseMixerGate(torch.autograd.Function):
    """Forward: gate_T1 * scale_T1. Backward: the logits get g * (onehot(pick) - p)."""

    @staticmethod
    def forward(ctx, logits_TE, gate_T1, pick_T1, probs_TE, scale_T1):  # noqa: D401
        ctx.save_for_backward(gate_T1, pick_T1, probs_TE, scale_T1)
        return gate_T1 * scale_T1

    @staticmethod
    def backward(ctx, grad_T1):
        gate_T1, pick_T1, probs_TE, _ = ctx.saved_tensors
        g_T1 = grad_T1 * gate_T1
        grad_TE = -probs_TE * g_T1
        grad_TE = grad_TE.scatter_add(-1, pick_T1, g_T1)
        return grad_TE, None, None, None, None


def _survivors(logits_TE: torch.Tensor, candidates_TE: torch.Tensor, eps: float) -> torch.Tensor:
    """Candidate logits with the ones too far below the best candidate set to -inf."""
    with torch.no_grad():
        best_T1 = candidates_TE.max(dim=-1, keepdim=True).values
        factor_TE = logits_TE.abs().clamp(min=best_T1)
        far_TE = ((best_T1 - logits_TE) / factor_TE) > 2 * eps
    return candidates_TE.masked_fill(far_TE, float("-inf"))


@register_router("sparsemixer")
class SparseMixerRouter(Router):
    def forward(self, x_TD: torch.Tensor) -> Routing:
        eps = self.cfg.sparsemixer_eps
        logits_TE = self.logits(x_TD)  # (T, E) fp32
        candidates_TE = logits_TE
        picks, gates = [], []
        for _ in range(self.cfg.top_k):
            kept_TE = _survivors(logits_TE, candidates_TE, eps)
            if self.training:
                gumbel_TE = -torch.empty_like(kept_TE).exponential_().log()
                pick_T1 = (kept_TE.detach() + gumbel_TE).argmax(dim=-1, keepdim=True)
            else:
                pick_T1 = kept_TE.argmax(dim=-1, keepdim=True)
            probs_TE = kept_TE.softmax(dim=-1)
            gate_T1 = probs_TE.gather(-1, pick_T1)
            if self.training:
                is_best_T1 = pick_T1 == probs_TE.argmax(dim=-1, keepdim=True)
                lucky_T1 = torch.rand_like(gate_T1) > 0.75
                scale_T1 = torch.where(is_best_T1 | lucky_T1, 1.0, 0.3333).to(gate_T1.dtype)
                gate_T1 = _SparseMixerGate.apply(logits_TE, gate_T1.detach(), pick_T1, probs_TE.detach(), scale_T1)
            picks.append(pick_T1)
            gates.append(gate_T1)
            candidates_TE = candidates_TE.scatter(-1, pick_T1, float("-inf"))
        topk_idx_TK, weight_TK = torch.cat(picks, dim=-1), torch.cat(gates, dim=-1)
        return Routing.from_topk(topk_idx_TK, weight_TK, logits_TE, logits_TE.softmax(dim=-1))
