"""Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in
MoE Models", arXiv 2403.07652; code ZhenweiAn/Dynamic_MoE).

P = softmax(logits) over E, sorted descending; a token keeps the smallest prefix of experts whose
cumulative probability reaches ``top_p`` (an expert is kept when the probability mass before it is
still < p, so the first expert is always kept). NOTE ties: the public Dynamic-MoE code keeps the
experts whose cumulative sum is <= p plus the first one past p, which keeps one more expert when a
prefix sums to exactly p (uniform P at E = 4, p = 0.5: moelab keeps 2, that code 3); elsewhere the
two rules agree. Gates are the raw probabilities of the kept experts,
not renormalised. The paper's dynamic loss (mean entropy of P, ``entropy_loss_coef``, 1e-4 in the
AoE paper's reproduction) keeps the router from flattening P to activate many experts.

The number of experts per token varies (1..E) and is logged by the MoE layer
(``last_metrics["experts_per_token_mean"]``). ``top_k`` plays no part in routing; it is the nominal
budget used for the active-parameter count and for capacity (ceil(cf * T * top_k / E)).

Shape legend: T tokens, E experts, A assignments.
"""

from __future__ import annotations

import torch

from moelab.moe.routers.base import Router, register_router
from moelab.moe.routing import Routing


@register_router("top_p")
class TopPRouter(Router):
    def route(self, logits_TE: torch.Tensor) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        sorted_TE, order_TE = probs_TE.sort(dim=-1, descending=True, stable=True)
        cum = sorted_TE.detach().cumsum(dim=-1)
        before_TE = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # mass before each
        keep_TE = before_TE < self.cfg.top_p
        t_A, j_A = keep_TE.nonzero(as_tuple=True)  # token-major order
        return Routing(t_A, order_TE[t_A, j_A], sorted_TE[t_A, j_A], logits_TE, probs_TE,
                       num_experts=probs_TE.shape[-1])
