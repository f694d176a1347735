"""Routed experts stored stacked (gpt-fast / torchtitan layout), with a fast path and a reference loop.

Parameters: gate_EFD, up_EFD (E, F, D) and down_EDF (E, D, F); expert e computes
down_e(act(x gate_e^T) * (x up_e^T)), the SwiGLU FFN of Shazeer 2020.

Shape legend: E experts, F expert FFN dim, D model dim, A assignments sorted by expert, T tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.layers.norm import activation_fn
from moelab.moe.kernels import grouped_experts, has_grouped_mm, sorted_experts


class StackedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, ffn_dim: int, activation: str = "silu"):
        super().__init__()
        self.num_experts, self.d_model, self.ffn_dim = num_experts, d_model, ffn_dim
        self.gate_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))
        self.up_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))
        self.down_EDF = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim))
        self.act = activation_fn(activation)
        self.activation = activation
        # "auto": torch._grouped_mm on CUDA, the sorted per-expert kernel elsewhere; "sorted",
        # "grouped" or "loop" (plain autograd, the pre-kernel path) force one
        self.impl = "auto"
        # capacity mode (router.capacity_factor set): "sorted" runs the kernel above on the kept rows;
        # "batched" pads every expert to C rows and runs (E, C, D) batched matmuls (GShard's layout)
        self.capacity_impl = "sorted"

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert e on any batch of rows."""
        h_NF = self.act(F.linear(x_ND, self.gate_EFD[e])) * F.linear(x_ND, self.up_EFD[e])
        return F.linear(h_NF, self.down_EDF[e])

    def _aligned(self, x_AD: torch.Tensor) -> bool:
        """torch._grouped_mm needs row strides that are multiples of 16 bytes."""
        return all((n * x_AD.element_size()) % 16 == 0 for n in (self.d_model, self.ffn_dim))

    def resolve_impl(self, x_AD: torch.Tensor) -> str:
        """The implementation ``forward`` runs for these rows. "auto" takes ``torch._grouped_mm`` on
        CUDA (one call, no host sync, no graph break under torch.compile) and the sorted per-expert
        kernel elsewhere (``_grouped_mm`` on CPU is slower, and its compile-time shape check accepts
        only bf16)."""
        if self.impl != "auto":
            return self.impl
        grouped = has_grouped_mm() and self._aligned(x_AD) and x_AD.is_cuda
        return "grouped" if grouped else "sorted"

    def wants_count_tensor(self, x_AD: torch.Tensor) -> bool:
        """True when ``forward`` takes the per-expert counts as a device tensor instead of a list."""
        return self.resolve_impl(x_AD) == "grouped"

    def forward(self, x_AD: torch.Tensor, counts_E: list[int] | torch.Tensor) -> torch.Tensor:
        """Fast path: rows of ``x_AD`` are sorted by expert, ``counts_E[e]`` rows for expert e;
        each expert runs once on its contiguous slice (experts with no rows are skipped).
        See :mod:`moelab.moe.kernels`."""
        impl = self.resolve_impl(x_AD)
        if impl == "grouped":
            counts = counts_E if torch.is_tensor(counts_E) else torch.tensor(counts_E, device=x_AD.device)
            return grouped_experts(x_AD, self.gate_EFD, self.up_EFD, self.down_EDF, counts, self.activation)
        if impl == "sorted":
            return sorted_experts(x_AD, self.gate_EFD, self.up_EFD, self.down_EDF, counts_E, self.activation)
        outs, start = [], 0
        for e, n in enumerate(counts_E):  # "loop": plain autograd, per expert
            if n:
                outs.append(self.expert(e, x_AD[start:start + n]))
            start += n
        return torch.cat(outs) if outs else x_AD.new_zeros(0, self.d_model)


def reference_moe(experts: StackedExperts, x_TD: torch.Tensor, token_idx_A: torch.Tensor,
                  expert_idx_A: torch.Tensor, weight_A: torch.Tensor) -> torch.Tensor:
    """Slow, obviously-correct loop: every assignment adds weight * expert(token) to its token."""
    out_TD = torch.zeros_like(x_TD)
    for a in range(token_idx_A.numel()):
        t, e = int(token_idx_A[a]), int(expert_idx_A[a])
        y_D = experts.expert(e, x_TD[t:t + 1])[0]
        out_TD[t] = out_TD[t] + weight_A[a].to(x_TD.dtype) * y_D
    return out_TD
