"""Expert parallelism applied from outside the model (torchtitan / gpt-fast style): each rank of an
expert-parallel group keeps E / P of every MoE layer's routed experts and runs them for the tokens
of every rank; routing, losses, metrics and shared experts stay on the token's own rank.

Per MoE layer and forward (rows already sorted by expert, ``counts_E`` rows for expert e):
  1. exchange counts: rank r tells rank s how many of its rows go to each of s's local experts
     (an all-to-all of a (P, E/P) count matrix);
  2. all-to-all the rows with variable split sizes (rows for rank s are one contiguous block,
     because experts are owned in contiguous ranges and rows are sorted by expert);
  3. regroup the received rows by local expert, run the fast expert kernel, undo the regrouping;
  4. all-to-all the outputs back (the same splits reversed).
``torch.distributed.nn.functional.all_to_all_single`` carries the gradients back the same way, so
backward is the transpose of forward and every expert's weight gradient sums the contributions of
all ranks' tokens, as in one process.

Shape legend: A assignment rows, E experts, L = E / P local experts, P expert-parallel ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
import warnings

with warnings.catch_warnings():  # the differentiable all-to-all; its FutureWarning names a private successor
    warnings.simplefilter("ignore", FutureWarning)
    from torch.distributed.nn.functional import all_to_all_single

from moelab.errors import ConfigError
from moelab.moe.experts import StackedExperts
from moelab.moe.kernels import sorted_experts
from moelab.moe.layer import MoELayer


class ExpertParallelExperts(nn.Module):
    """The local E / P experts of a StackedExperts, with the all-to-all exchange around them.
    Same call as StackedExperts: ``forward(x_AD, counts_E)`` with rows sorted by (global) expert."""

    def __init__(self, experts: StackedExperts, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        E = experts.num_experts
        if E % self.world:
            raise ConfigError("moe.num_experts", E, f"must be divisible by the expert-parallel size {self.world}")
        self.num_experts, self.local = E, E // self.world
        self.d_model, self.ffn_dim, self.activation = experts.d_model, experts.ffn_dim, experts.activation
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        self.expert_offset = lo
        self.gate_EFD = nn.Parameter(experts.gate_EFD.detach()[lo:hi].clone())
        self.up_EFD = nn.Parameter(experts.up_EFD.detach()[lo:hi].clone())
        self.down_EDF = nn.Parameter(experts.down_EDF.detach()[lo:hi].clone())

    def wants_count_tensor(self, x_AD: torch.Tensor) -> bool:
        return False

    def forward(self, x_AD: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        P, L = self.world, self.local
        counts_PL = torch.tensor(counts_E, dtype=torch.long).view(P, L)  # my rows for each rank's experts
        recv_PL = torch.empty_like(counts_PL)
        dist.all_to_all_single(recv_PL, counts_PL, group=self.group)  # rows each rank sends me, per local expert
        send_splits = counts_PL.sum(1).tolist()
        recv_splits = recv_PL.sum(1).tolist()
        x_RD = all_to_all_single(x_AD.new_empty(sum(recv_splits), x_AD.shape[1]), x_AD.contiguous(),
                                 output_split_sizes=recv_splits, input_split_sizes=send_splits, group=self.group)
        # received rows are [from rank 0: local expert 0..L-1][from rank 1: ...]: regroup by local expert
        src_of = torch.arange(P).repeat_interleave(L)
        exp_of = torch.arange(L).repeat(P)
        block_expert = exp_of.repeat_interleave(recv_PL.flatten())  # (R,) local expert of each received row
        order = torch.argsort(block_expert * P + src_of.repeat_interleave(recv_PL.flatten()), stable=True)
        local_counts = recv_PL.sum(0).tolist()
        y_sorted = sorted_experts(x_RD[order], self.gate_EFD, self.up_EFD, self.down_EDF, local_counts,
                                  self.activation)
        y_RD = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        return all_to_all_single(x_AD.new_empty(x_AD.shape), y_RD.contiguous(),
                                 output_split_sizes=send_splits, input_split_sizes=recv_splits, group=self.group)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Shard the routed experts of every MoE layer (MTP modules' included) over ``group``; returns the
    number of layers sharded. Every rank must call it on the same model (same weights)."""
    n = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            if not isinstance(module.experts, StackedExperts):
                raise ConfigError("moe.aoe", "set", "expert parallelism shards StackedExperts; AoE experts are "
                                                   "not supported yet")
            module.experts = ExpertParallelExperts(module.experts, group)
            n += 1
    return n
