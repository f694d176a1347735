"""Dropless dispatch: permute assignments by expert, run experts on contiguous slices, combine.

Shape legend: T tokens, D model dim, E experts, A assignments.
"""

from __future__ import annotations

import torch

from moelab.moe.experts import StackedExperts
from moelab.moe.routing import Routing


def dispatch_combine(experts: StackedExperts, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """sum over assignments (t, e, w) of w * expert_e(x_t), written into token t; tokens with no
    assignment get zeros (their output is the residual stream alone)."""
    order_A = torch.argsort(routing.expert_idx_A, stable=True)  # group assignments by expert
    token_sorted_A = routing.token_idx_A[order_A]
    counts_E = torch.bincount(routing.expert_idx_A, minlength=experts.num_experts).tolist()
    y_AD = experts(x_TD[token_sorted_A], counts_E)  # (A, D)
    y_AD = y_AD * routing.weight_A[order_A].to(y_AD.dtype)[:, None]
    out_TD = torch.zeros_like(x_TD)
    return out_TD.index_add(0, token_sorted_A, y_AD)
