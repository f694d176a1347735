"""Routed experts stored stacked (gpt-fast / torchtitan layout), with a fast path and a reference loop.

Parameters: gate_EFD, up_EFD (E, F, D) and down_EDF (E, D, F); expert e computes
down_e(act(x gate_e^T) * (x up_e^T)), the SwiGLU FFN of Shazeer 2020.

Shape legend: E experts, F expert FFN dim, D model dim, A assignments sorted by expert, T tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.layers.norm import activation_fn


class StackedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, ffn_dim: int, activation: str = "silu"):
        super().__init__()
        self.num_experts, self.d_model, self.ffn_dim = num_experts, d_model, ffn_dim
        self.gate_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))
        self.up_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))
        self.down_EDF = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim))
        self.act = activation_fn(activation)

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert e on any batch of rows."""
        h_NF = self.act(x_ND @ self.gate_EFD[e].t()) * (x_ND @ self.up_EFD[e].t())
        return h_NF @ self.down_EDF[e].t()

    def forward(self, x_AD: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """Fast path: rows of ``x_AD`` are sorted by expert, ``counts_E[e]`` rows for expert e;
        each expert runs once on its contiguous slice (experts with no rows are skipped)."""
        out_AD = torch.empty_like(x_AD)
        start = 0
        for e, n in enumerate(counts_E):
            if n:
                out_AD[start:start + n] = self.expert(e, x_AD[start:start + n])
            start += n
        return out_AD


def reference_moe(experts: StackedExperts, x_TD: torch.Tensor, token_idx_A: torch.Tensor,
                  expert_idx_A: torch.Tensor, weight_A: torch.Tensor) -> torch.Tensor:
    """Slow, obviously-correct loop: every assignment adds weight * expert(token) to its token."""
    out_TD = torch.zeros_like(x_TD)
    for a in range(token_idx_A.numel()):
        t, e = int(token_idx_A[a]), int(expert_idx_A[a])
        y_D = experts.expert(e, x_TD[t:t + 1])[0]
        out_TD[t] = out_TD[t] + weight_A[a].to(x_TD.dtype) * y_D
    return out_TD
