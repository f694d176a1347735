"""Dispatch: optional capacity dropping, then permute assignments by expert, run experts on
contiguous slices, and combine.

Capacity (Switch eq. 3, GShard): C = ceil(capacity_factor * T * K / E) assignments per expert.
An over-full expert keeps its C highest-priority assignments; the others are removed from the
routing, so a token whose every assignment was dropped gets 0 from the MoE and its block output is
the residual stream (Switch §2.2). Priorities:
- "position": every token's 1st choice before any token's 2nd choice, and within a choice rank
  earlier sequence positions first (ties: earlier sequence of the batch). This is GShard Alg. 1 and
  the flaxformer/T5X token-choice routers ("make num_selected_experts the leading axis to ensure
  that top-1 choices have priority over top-2 choices"); within a rank it is the cumsum order of
  Switch, which makes late tokens drop first (OpenMoE's finding).
- "score": batch-prioritised routing (Riquelme et al. 2021 §4.1): every token's 1st choice before
  any 2nd choice, and within a choice rank tokens by their top gate, highest first.
A token's choice rank is the order of its assignments in the routing (routers emit a token's
assignments best first: top-k order, SparseMixer's pick order, top-p's sorted order; DeepSeek-V3
ranks by the biased selection score s + b, not by the gate).
A capacity that no expert exceeds keeps the routing unchanged, so dropless and capacity-with-no-
overflow give bit-identical outputs.

Shape legend: T tokens, D model dim, E experts, A assignments.
"""

from __future__ import annotations

import math

import torch

from moelab.moe.aoe import AoEExperts
from moelab.moe.experts import StackedExperts
from moelab.moe.routing import Routing, TokenLayout, count_ids


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """C = ceil(capacity_factor * T * K / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def _stable_sort_by(perm_A: torch.Tensor, key_A: torch.Tensor) -> torch.Tensor:
    """Reorder ``perm_A`` stably by ``key_A[perm_A]`` (apply least significant keys first)."""
    return perm_A[torch.argsort(key_A[perm_A], stable=True)]


def choice_rank(routing: Routing) -> torch.Tensor:
    """(A,) 0 for each token's first assignment in routing order (its 1st choice), 1 for its next, ..."""
    A = routing.token_idx_A.numel()
    perm = torch.arange(A, device=routing.token_idx_A.device)
    perm = _stable_sort_by(perm, routing.token_idx_A)
    counts_T = count_ids(routing.token_idx_A, routing.num_tokens)
    start_T = counts_T.cumsum(0) - counts_T
    rank_A = torch.empty_like(perm)
    rank_A[perm] = torch.arange(A, device=perm.device) - start_T[routing.token_idx_A[perm]]
    return rank_A


def capacity_keep_mask(routing: Routing, capacity: int, priority: str, seq_len: int | TokenLayout) -> torch.Tensor:
    """(A,) bool: which assignments fit in their expert's ``capacity``. Tokens are ordered
    sequence-major (token t is position t % seq_len of sequence t // seq_len, or as a TokenLayout says).
    Every priority keeps a choice rank whole before the next (all 1st choices, then all 2nd ...); within
    a rank "position" keeps tokens in that flattened order, "position_global" earlier positions of
    all sequences first, "score" higher top gates first."""
    token_A, expert_A = routing.token_idx_A, routing.expert_idx_A
    A = token_A.numel()
    perm = torch.arange(A, device=token_A.device)
    if priority == "position":  # flattened order, sequence by sequence (OpenMoE's Top2Router, flaxformer)
        perm = _stable_sort_by(perm, token_A)
        perm = _stable_sort_by(perm, choice_rank(routing))
    elif priority == "position_global":  # position 0 of every sequence, then position 1 of every sequence ...
        layout = TokenLayout.of(seq_len, routing.num_tokens, token_A.device)
        perm = _stable_sort_by(perm, layout.pos_T[token_A] * max(layout.num_seqs, 1) + layout.seq_T[token_A])
        perm = _stable_sort_by(perm, choice_rank(routing))
    elif priority == "score":
        w = routing.weight_A.detach()
        top_gate_T = torch.full((routing.num_tokens,), float("-inf"), device=w.device)
        top_gate_T = top_gate_T.scatter_reduce(0, token_A, w, reduce="amax")
        perm = _stable_sort_by(perm, -top_gate_T[token_A])
        perm = _stable_sort_by(perm, choice_rank(routing))
    else:
        raise ValueError(f"unknown drop priority {priority!r}")
    perm = _stable_sort_by(perm, expert_A)  # grouped by expert, in priority order within
    counts_E = count_ids(expert_A, routing.num_experts)
    start_E = counts_E.cumsum(0) - counts_E
    slot_sorted = torch.arange(A, device=perm.device) - start_E[expert_A[perm]]
    keep_A = torch.empty(A, dtype=torch.bool, device=perm.device)
    keep_A[perm] = slot_sorted < capacity
    return keep_A


# At most this many assignments without autograd (decoding a few tokens): no sort, no kernel, each
# chosen expert runs once on its rows.
DECODE_MAX_ASSIGNMENTS = 16


def dispatch_combine(experts: StackedExperts | AoEExperts, x_TD: torch.Tensor, routing: Routing,
                     capacity: int | None = None) -> torch.Tensor:
    """sum over assignments (t, e, w) of w * expert_e(x_t), written into token t; tokens with no
    assignment get zeros (their output is the residual stream alone). ``capacity``: the routing is
    already cut to at most that many assignments per expert (capacity mode), which
    ``experts.capacity_impl = "batched"`` runs as padded (E, C, D) batched matmuls."""
    # the few-token path runs experts locally; expert-parallel experts (no ``expert``) must always take
    # part in the all-to-all, so they skip it
    few = routing.expert_idx_A.numel() <= DECODE_MAX_ASSIGNMENTS and hasattr(experts, "expert")
    if few and not torch.is_grad_enabled():
        if torch.compiler.is_compiling() and isinstance(experts, StackedExperts):
            return _gathered_combine(experts, x_TD, routing)
        return _decode_combine(experts, x_TD, routing)
    if capacity is not None and isinstance(experts, StackedExperts) and experts.capacity_impl == "batched":
        return _batched_capacity_combine(experts, x_TD, routing, capacity)
    order_A = torch.argsort(routing.expert_idx_A, stable=True)  # group assignments by expert
    token_sorted_A = routing.token_idx_A[order_A]
    extra = {}
    if routing.expert_cache_TEL is not None:  # AoE: each row's cached x W_down of its own expert
        extra["low_AL"] = routing.expert_cache_TEL[token_sorted_A, routing.expert_idx_A[order_A]]
    counts_E = count_ids(routing.expert_idx_A, experts.num_experts)
    if not experts.wants_count_tensor(x_TD):
        counts_E = counts_E.tolist()  # the one host sync of a forward: the per-expert row counts
    y_AD = experts(x_TD[token_sorted_A], counts_E, **extra)  # (A, D)
    y_AD = y_AD * routing.weight_A[order_A].to(y_AD.dtype)[:, None]
    out_TD = torch.zeros_like(x_TD)
    return out_TD.index_add(0, token_sorted_A, y_AD)


def _decode_combine(experts, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The few-token path: touches only the chosen experts' weights, one host sync for the indices."""
    out_TD = torch.zeros_like(x_TD)
    experts_A = routing.expert_idx_A.tolist()
    cache = routing.expert_cache_TEL
    for e in sorted(set(experts_A)):
        rows_A = torch.tensor([a for a, x in enumerate(experts_A) if x == e], device=x_TD.device)
        tok = routing.token_idx_A[rows_A]
        args = (x_TD[tok],) if cache is None else (x_TD[tok], cache[tok, e])
        y = experts.expert(e, *args) * routing.weight_A[rows_A].to(x_TD.dtype)[:, None]
        out_TD.index_add_(0, tok, y)
    return out_TD


def _gathered_combine(experts: StackedExperts, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The few-token path under torch.compile: each assignment's expert weights gathered into a
    batched matmul. Static shapes and no host sync, so a compiled decode step is one graph that does
    not recompile for every new set of chosen experts (the eager path's Python loop over them would)."""
    e_A, tok_A = routing.expert_idx_A, routing.token_idx_A
    x_AD1 = x_TD[tok_A][:, :, None]  # (A, D, 1)
    g_AF = torch.bmm(experts.gate_EFD[e_A], x_AD1).squeeze(-1)
    u_AF = torch.bmm(experts.up_EFD[e_A], x_AD1).squeeze(-1)
    y_AD = torch.bmm(experts.down_EDF[e_A], (experts.act(g_AF) * u_AF)[:, :, None]).squeeze(-1)
    y_AD = y_AD * routing.weight_A.to(y_AD.dtype)[:, None]
    return torch.zeros_like(x_TD).index_add(0, tok_A, y_AD)


def _batched_capacity_combine(experts: StackedExperts, x_TD: torch.Tensor, routing: Routing,
                              capacity: int) -> torch.Tensor:
    """Capacity mode as GShard / Switch compute it: every expert gets a (C, D) buffer, its kept
    assignments in slots 0..n_e-1 and zeros after, and all experts run as three batched matmuls
    (static shapes, no host sync; the padding rows cost compute, which the sorted kernel avoids)."""
    E, C = experts.num_experts, capacity
    e_A, tok_A = routing.expert_idx_A, routing.token_idx_A
    order_A = torch.argsort(e_A, stable=True)
    counts_E = count_ids(e_A, E)
    start_E = counts_E.cumsum(0) - counts_E
    slot_A = torch.empty_like(order_A)
    slot_A[order_A] = torch.arange(order_A.numel(), device=order_A.device) - start_E[e_A[order_A]]
    x_ECD = x_TD.new_zeros(E, C, x_TD.shape[1]).index_put((e_A, slot_A), x_TD[tok_A])
    h_ECF = experts.act(torch.bmm(x_ECD, experts.gate_EFD.transpose(1, 2))) * torch.bmm(
        x_ECD, experts.up_EFD.transpose(1, 2))
    y_ECD = torch.bmm(h_ECF, experts.down_EDF.transpose(1, 2))
    y_AD = y_ECD[e_A, slot_A] * routing.weight_A.to(x_TD.dtype)[:, None]
    return torch.zeros_like(x_TD).index_add(0, tok_A, y_AD)
