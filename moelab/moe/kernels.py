"""Fast routed-expert computation: rows sorted by expert, per-expert products written straight into
their rows, and a hand-written backward.

Why a custom autograd function: with plain autograd, writing each expert's output into a slice of a
preallocated (A, D) buffer makes backward copy the whole (A, D) gradient once per expert
(CopySlices), O(E * A * D) work that made E=64 top-8 ~6x slower than transformers; autograd also
keeps four (A, F) tensors (gate, up, act(gate), product). Here forward saves only the sorted input
x_AD and the pre-activations g_AF, u_AF; backward recomputes act(g) and the product from them and
writes every gradient into its rows once.

Per expert e with rows x_e (n, D):
  forward:  g = x_e W_gate^T;  u = x_e W_up^T;  h = act(g) * u;  y = h W_down^T
  backward: dh = dy W_down;  dW_down = dy^T h;  dg = dh * u * act'(g);  du = dh * act(g)
            dW_gate = dg^T x_e;  dW_up = du^T x_e;  dx_e = dg W_gate + du W_up
``grouped_experts`` also runs ``torch._grouped_mm`` (one call for all experts; autograd by torch),
used on CUDA where it is the fast path and available on CPU for testing.

Shape legend: A assignments sorted by expert, E experts, F expert FFN dim, D model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def act_and_grad(name: str, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """act(g) and act'(g) for silu, gelu (erf) and gelu_tanh."""
    if name == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
        return g * cdf, cdf + g * pdf
    if name == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        inner = c * (g + 0.044715 * g ** 3)
        t = torch.tanh(inner)
        return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c * (1 + 3 * 0.044715 * g * g)
    raise ValueError(f"unknown activation {name!r}")


def _act(name: str, g: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(g)
    if name == "gelu":
        return F.gelu(g)
    return F.gelu(g, approximate="tanh")


class _SortedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD, gate_EFD, up_EFD, down_EDF, counts_E: list[int], act: str):
        E, Fd, D = gate_EFD.shape
        A = x_AD.shape[0]
        # gate and up as two products into two buffers: fusing them needs a copy of all experts'
        # weights per call, which costs more than it saves when an expert has few rows (decoding)
        g_AF, u_AF = x_AD.new_empty(A, Fd), x_AD.new_empty(A, Fd)
        y_AD = x_AD.new_empty(A, D)
        start = 0
        for e, n in enumerate(counts_E):
            if n:
                rows = slice(start, start + n)
                x = x_AD[rows]
                torch.mm(x, gate_EFD[e].t(), out=g_AF[rows])
                torch.mm(x, up_EFD[e].t(), out=u_AF[rows])
                torch.mm(_act(act, g_AF[rows]) * u_AF[rows], down_EDF[e].t(), out=y_AD[rows])
            start += n
        ctx.save_for_backward(x_AD, g_AF, u_AF, gate_EFD, up_EFD, down_EDF)  # the parameters themselves
        ctx.counts, ctx.act = counts_E, act
        return y_AD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_AD):
        x_AD, g_AF, u_AF, gate_EFD, up_EFD, down_EDF = ctx.saved_tensors
        dy_AD = dy_AD.contiguous()
        dx_AD = torch.empty_like(x_AD)
        d_gate, d_up, d_down = torch.zeros_like(gate_EFD), torch.zeros_like(up_EFD), torch.zeros_like(down_EDF)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                rows = slice(start, start + n)
                g, u, x, dy = g_AF[rows], u_AF[rows], x_AD[rows], dy_AD[rows]
                a, da = act_and_grad(ctx.act, g)
                torch.mm(dy.t(), a * u, out=d_down[e])  # dW_down = dy^T h
                dh = dy @ down_EDF[e]  # (n, F)
                dg, du = dh * u * da, dh * a
                torch.mm(dg.t(), x, out=d_gate[e])
                torch.mm(du.t(), x, out=d_up[e])
                torch.mm(dg, gate_EFD[e], out=dx_AD[rows])
                dx_AD[rows].addmm_(du, up_EFD[e])
            start += n
        return dx_AD, d_gate, d_up, d_down, None, None


def sorted_experts(x_AD: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor,
                   counts_E: list[int], act: str) -> torch.Tensor:
    """(A, D) outputs of rows sorted by expert (``counts_E[e]`` rows for expert e)."""
    return _SortedExperts.apply(x_AD, gate_EFD, up_EFD, down_EDF, counts_E, act)


def grouped_experts(x_AD: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor,
                    counts_E: torch.Tensor, act: str) -> torch.Tensor:
    """The same with ``torch._grouped_mm`` (offsets = cumulative counts); autograd by torch."""
    Fd = gate_EFD.shape[1]
    offs = counts_E.cumsum(0).to(torch.int32)
    gu = torch._grouped_mm(x_AD, torch.cat([gate_EFD, up_EFD], dim=1).transpose(1, 2), offs=offs)
    h = _act(act, gu[:, :Fd]) * gu[:, Fd:]
    return torch._grouped_mm(h, down_EDF.transpose(1, 2), offs=offs)


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


class _SortedAoEExperts(torch.autograd.Function):
    """AoE experts (moelab.moe.aoe) on rows sorted by expert, from the rows' low-rank activations
    c = x W_down (A, L): g = c W_up^T, u = x W_p^T, h = act(g) * u, y = h W_o^T; saves x, c and the
    (A, 2W) pre-activations only."""

    @staticmethod
    def forward(ctx, x_AD, c_AL, wup_EWL, wp_EWD, wo_EDW, counts_E: list[int], act: str):
        E, W, _ = wup_EWL.shape
        A, D = x_AD.shape
        gu_A2W = x_AD.new_empty(A, 2 * W)
        y_AD = x_AD.new_empty(A, D)
        start = 0
        for e, n in enumerate(counts_E):
            if n:
                rows = slice(start, start + n)
                torch.mm(c_AL[rows], wup_EWL[e].t(), out=gu_A2W[rows, :W])
                torch.mm(x_AD[rows], wp_EWD[e].t(), out=gu_A2W[rows, W:])
                torch.mm(_act(act, gu_A2W[rows, :W]) * gu_A2W[rows, W:], wo_EDW[e].t(), out=y_AD[rows])
            start += n
        ctx.save_for_backward(x_AD, c_AL, gu_A2W, wup_EWL, wp_EWD, wo_EDW)
        ctx.counts, ctx.act = counts_E, act
        return y_AD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_AD):
        x_AD, c_AL, gu_A2W, wup, wp, wo = ctx.saved_tensors
        W = wup.shape[1]
        dy_AD = dy_AD.contiguous()
        dx, dc = torch.empty_like(x_AD), torch.empty_like(c_AL)
        dwup, dwp, dwo = torch.zeros_like(wup), torch.zeros_like(wp), torch.zeros_like(wo)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                rows = slice(start, start + n)
                g, u = gu_A2W[rows, :W], gu_A2W[rows, W:]
                a, da = act_and_grad(ctx.act, g)
                dy = dy_AD[rows]
                torch.mm(dy.t(), a * u, out=dwo[e])
                dh = dy @ wo[e]
                dg, du = dh * u * da, dh * a
                torch.mm(dg.t(), c_AL[rows], out=dwup[e])
                torch.mm(du.t(), x_AD[rows], out=dwp[e])
                torch.mm(dg, wup[e], out=dc[rows])
                torch.mm(du, wp[e], out=dx[rows])
            start += n
        return dx, dc, dwup, dwp, dwo, None, None


def sorted_aoe_experts(x_AD, c_AL, wup_EWL, wp_EWD, wo_EDW, counts_E: list[int], act: str) -> torch.Tensor:
    return _SortedAoEExperts.apply(x_AD, c_AL, wup_EWL, wp_EWD, wo_EDW, counts_E, act)
