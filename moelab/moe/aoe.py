"""Autonomy-of-Experts experts (Lv et al. 2025, "Autonomy-of-Experts Models", arXiv 2501.13074, ICML 2025).

An AoE expert factorises its gate projection, W_g = W_down W_up (eq. 3):
    E_i(x) = (SiLU(x W_down^i W_up^i) * x W_p^i) W_o^i
with W_down^i: d_model x d_low, W_up^i: d_low x d_wide, W_p^i: d_model x d_wide, W_o^i: d_wide x d_model.
The AoE layer (Alg. 2, eq. 4) has no router: C = x [W_down^1 ... W_down^n] for every token in one
matmul, p_i = ||C_i|| (L2 over d_low; L1 / L-inf options, App. A), the top-K experts by p finish
from the cached C_i (never recomputed) with gates softmax(p[I]); the others stop after W_down and
never form a d_wide activation. The same experts with a conventional router compute x W_down only
for their assignments (the Table 2 "factorised W_g" ablation).

Init: the model's generic Normal(0, init_std) for all four matrices (W_o scaled as every residual
output), as the authors' ``ExpertAoE.reset_parameters`` does with 0.02; W_down W_up then starts with
std sqrt(d_low) * init_std^2, smaller than a directly drawn W_g.

Parameters, stacked per expert like :class:`moelab.moe.experts.StackedExperts` ((out, in) per expert):
wdown_ELD (E, d_low, D), wup_EWL (E, d_wide, d_low), wp_EWD (E, d_wide, D), wo_EDW (E, D, d_wide).

Shape legend: T tokens, D model dim, E experts, L d_low, W d_wide, A assignments sorted by expert.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.layers.norm import activation_fn
from moelab.moe.kernels import sorted_aoe_experts


def expert_norms(c_TEL: torch.Tensor, norm: str) -> torch.Tensor:
    """(T, E) fp32 scores: the L2 / L1 / L-inf norm of each expert's d_low vector."""
    c = c_TEL.float()
    if norm == "l2":
        return torch.linalg.vector_norm(c, ord=2, dim=-1)
    if norm == "l1":
        return c.abs().sum(dim=-1)
    if norm == "linf":
        return c.abs().amax(dim=-1)
    raise ValueError(f"unknown AoE norm {norm!r}")


class AoEExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_low: int, d_wide: int, activation: str = "silu"):
        super().__init__()
        self.num_experts, self.d_model, self.d_low, self.d_wide = num_experts, d_model, d_low, d_wide
        self.wdown_ELD = nn.Parameter(torch.empty(num_experts, d_low, d_model))
        self.wup_EWL = nn.Parameter(torch.empty(num_experts, d_wide, d_low))
        self.wp_EWD = nn.Parameter(torch.empty(num_experts, d_wide, d_model))
        self.wo_EDW = nn.Parameter(torch.empty(num_experts, d_model, d_wide))
        self.act = activation_fn(activation)
        self.activation = activation
        self.impl = "sorted"  # the kernel of moelab.moe.kernels; "loop": plain autograd per expert

    def low_rank_all(self, x_TD: torch.Tensor) -> torch.Tensor:
        """C = x W_down for every expert in one matmul: (T, E, L)."""
        T = x_TD.shape[0]
        return (x_TD @ self.wdown_ELD.reshape(-1, self.d_model).t()).view(T, self.num_experts, self.d_low)

    def expert(self, e: int, x_ND: torch.Tensor, c_NL: torch.Tensor | None = None) -> torch.Tensor:
        """Expert e on any batch of rows; ``c_NL`` = x W_down^e when already computed."""
        if c_NL is None:
            c_NL = x_ND @ self.wdown_ELD[e].t()
        h_NW = self.act(c_NL @ self.wup_EWL[e].t()) * (x_ND @ self.wp_EWD[e].t())
        return h_NW @ self.wo_EDW[e].t()

    def wants_count_tensor(self, x_AD: torch.Tensor) -> bool:
        """The AoE kernel loops over experts in Python: it takes the counts as a list (under
        torch.compile, a graph break here)."""
        return False

    def forward(self, x_AD: torch.Tensor, counts_E: list[int], low_AL: torch.Tensor | None = None) -> torch.Tensor:
        """Rows sorted by expert, ``counts_E[e]`` for expert e (as StackedExperts.forward); ``low_AL``
        holds each row's cached x W_down of its own expert (router-free AoE) or None (compute it)."""
        if self.impl == "sorted":
            if low_AL is None:  # router-based: x W_down for each row's own expert, with autograd
                low_AL = torch.cat([x_AD[s:s + n] @ self.wdown_ELD[e].t() for e, (s, n) in
                                    enumerate(zip(_starts(counts_E), counts_E))] or [x_AD.new_zeros(0, self.d_low)])
            return sorted_aoe_experts(x_AD, low_AL, self.wup_EWL, self.wp_EWD, self.wo_EDW, counts_E, self.activation)
        outs, start = [], 0
        for e, n in enumerate(counts_E):
            if n:
                c = None if low_AL is None else low_AL[start:start + n]
                outs.append(self.expert(e, x_AD[start:start + n], c))
            start += n
        return torch.cat(outs) if outs else x_AD.new_zeros(0, self.d_model)

    def active_param_count(self, k: float, scores_all: bool) -> float:
        """Parameters a token uses: k experts, plus every other expert's W_down when all experts
        score every token (router-free AoE)."""
        per_expert = self.d_model * self.d_low + self.d_low * self.d_wide + 2 * self.d_model * self.d_wide
        extra = (self.num_experts - k) * self.d_model * self.d_low if scores_all else 0
        return k * per_expert + extra


def _starts(counts_E: list[int]) -> list[int]:
    out, s = [], 0
    for n in counts_E:
        out.append(s)
        s += n
    return out


def reference_aoe(experts: AoEExperts, x_TD: torch.Tensor, top_k: int, norm: str = "l2") -> torch.Tensor:
    """Slow, per-token and per-expert loop written from Algorithm 2: every expert computes
    c_i = x W_down^i and p_i = ||c_i||; the top-K by p give gates softmax(p[I]); each chosen
    expert finishes (SiLU(c_i W_up^i) * x W_p^i) W_o^i."""
    out_TD = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        x_1D = x_TD[t:t + 1]
        cs = [x_1D @ experts.wdown_ELD[e].t() for e in range(experts.num_experts)]  # (1, L) each
        p_E = expert_norms(torch.stack(cs, dim=1), norm)[0]
        chosen = torch.topk(p_E, top_k).indices.tolist()
        gates = torch.softmax(p_E[chosen], dim=0)
        for g, e in zip(gates, chosen):
            out_TD[t] = out_TD[t] + g.to(x_TD.dtype) * experts.expert(e, x_1D, cs[e])[0]
    return out_TD
