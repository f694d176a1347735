"""Load-balancing losses as pure functions (no state, no coefficients: the router applies those).

Shape legend: T tokens, E experts, A assignments.
"""

from __future__ import annotations

import torch


def expert_counts(expert_idx_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, counting every one of a token's K slots: (E,) float."""
    return torch.bincount(expert_idx_A, minlength=num_experts).float()


def switch_load_balance_loss(probs_TE: torch.Tensor, expert_idx_A: torch.Tensor) -> torch.Tensor:
    """Switch Transformer eq. 4-6: E * sum_i f_i * P_i, unscaled (multiply by alpha outside).

    f_i: fraction of the A = T*K assignments that went to expert i (sums to 1; for K = 1 this is
    exactly Switch's fraction of tokens). P_i: mean router probability of expert i. At perfectly
    uniform routing f = P = 1/E and the loss is exactly 1, so alpha * loss = alpha. Only P carries
    a gradient. (HF's ``load_balancing_loss_func`` sums over K instead and equals K at balance.)
    """
    num_experts = probs_TE.shape[-1]
    f_E = expert_counts(expert_idx_A, num_experts) / max(expert_idx_A.numel(), 1)
    P_E = probs_TE.float().mean(dim=0)
    return num_experts * torch.sum(f_E.detach() * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE §3: (1/T) sum_t (log sum_j exp(logit_tj))^2, penalising large router logits."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
