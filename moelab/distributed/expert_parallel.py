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
The all-to-all's backward is the all-to-all with the splits swapped, so every expert's weight
gradient sums the contributions of all ranks' tokens, as in one process.

The local experts are DTensors sharded on dim 0 over the expert-parallel mesh, so their state-dict
entries have the full (E, ...) shape and torch.distributed.checkpoint can reshard them to any other
layout (FSDP2 then shards them further over the data-parallel mesh).

Shape legend: A assignment rows, E experts, L = E / P local experts, P expert-parallel ranks.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from moelab.errors import ConfigError
from moelab.moe.experts import StackedExperts
from moelab.moe.kernels import sorted_experts
from moelab.moe.layer import MoELayer


class A2AStats:
    """What one layer's all-to-alls did since the last ``reset``: rows of this rank's tokens dispatched
    to experts on other ranks, rows of other ranks' tokens this rank's experts received (a rank's
    rows for its own experts never leave it; the combine and the backward pass move the same rows
    back), and host seconds spent in all four all-to-alls, waiting for slower ranks included."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rows_sent = self.rows_received = 0
        self.seconds = 0.0


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, stats: A2AStats) -> torch.Tensor:
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    stats.seconds += time.perf_counter() - t0
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all with variable splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats):
        ctx.args = (out_splits, in_splits, group, stats)
        return _all_to_all(x, out_splits, in_splits, group, stats)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group, stats = ctx.args
        return _all_to_all(grad, in_splits, out_splits, group, stats), None, None, None, None


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


class ExpertParallelExperts(nn.Module):
    """The local E / P experts of a StackedExperts, with the all-to-all exchange around them.
    Same call as StackedExperts: ``forward(x_AD, counts_E)`` with rows sorted by (global) expert."""

    def __init__(self, experts: StackedExperts, mesh: DeviceMesh):
        super().__init__()
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        E = experts.num_experts
        if E % self.world:
            raise ConfigError("parallel.ep", self.world, f"must divide moe.num_experts={E}")
        self.num_experts, self.local = E, E // self.world
        self.d_model, self.ffn_dim, self.activation = experts.d_model, experts.ffn_dim, experts.activation
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        self.expert_offset = lo
        for name in ("gate_EFD", "up_EFD", "down_EDF"):
            local = getattr(experts, name).detach()[lo:hi].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False)))
        self.stats = A2AStats()

    def wants_count_tensor(self, x_AD: torch.Tensor) -> bool:
        return False

    def forward(self, x_AD: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        P, L = self.world, self.local
        counts_PL = torch.tensor(counts_E, dtype=torch.long).view(P, L)  # my rows for each rank's experts
        recv_PL = torch.empty_like(counts_PL)
        dist.all_to_all_single(recv_PL, counts_PL, group=self.group)  # rows each rank sends me, per local expert
        send_splits = counts_PL.sum(1).tolist()
        recv_splits = recv_PL.sum(1).tolist()
        x_RD = _AllToAll.apply(x_AD, recv_splits, send_splits, self.group, self.stats)
        self.stats.rows_sent += sum(send_splits) - send_splits[self.rank]
        self.stats.rows_received += sum(recv_splits) - recv_splits[self.rank]
        # received rows are [from rank 0: local expert 0..L-1][from rank 1: ...]: regroup by local expert
        src_of = torch.arange(P).repeat_interleave(L)
        exp_of = torch.arange(L).repeat(P)
        block_expert = exp_of.repeat_interleave(recv_PL.flatten())  # (R,) local expert of each received row
        order = torch.argsort(block_expert * P + src_of.repeat_interleave(recv_PL.flatten()), stable=True)
        local_counts = recv_PL.sum(0).tolist()
        y_sorted = sorted_experts(x_RD[order], _local(self.gate_EFD), _local(self.up_EFD), _local(self.down_EDF),
                                  local_counts, self.activation)
        y_RD = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        return _AllToAll.apply(y_RD, send_splits, recv_splits, self.group, self.stats)


def expert_parallel_layers(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh | None = None) -> int:
    """Shard the routed experts of every MoE layer (MTP modules' included) over ``mesh`` (a 1-D
    expert-parallel mesh; default: all ranks); returns the number of layers sharded. Every rank must
    call it on the same model (same weights)."""
    if mesh is None:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("ep",))
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        if not isinstance(layer.experts, StackedExperts):
            raise ConfigError("parallel.ep", mesh.size(), "expert parallelism shards stacked experts; AoE's "
                                                          "experts are not supported yet: use parallel.ep=1")
        router = layer.router_cfg
        if router.n_group > 1 and mesh.size() > 1 and router.n_group % mesh.size() and mesh.size() % router.n_group:
            raise ConfigError("parallel.ep", mesh.size(),
                              f"expert groups (router.n_group={router.n_group}) must align with ranks: one of the "
                              "two must divide the other, so group-limited routing limits the ranks a token visits")
        layer.experts = ExpertParallelExperts(layer.experts, mesh)
        layer.device_groups = mesh.size()  # DeepSeek's device-level losses count these real devices
    return len(layers)
