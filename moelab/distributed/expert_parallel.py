"""Expert parallelism applied from outside the model (torchtitan / gpt-fast style): each rank of an
expert-parallel group keeps E / P of every MoE layer's routed experts and runs them for the tokens
of every rank; routing, losses, metrics and shared experts stay on the token's own rank.

Per MoE layer and forward (rows already sorted by expert, ``counts_E`` rows for expert e, a tensor on
the data's device):
  1. exchange counts: rank r tells rank s how many of its rows go to each of s's local experts
     (an all-to-all of a (P, E/P) count matrix on the data's device), then the one host read of a
     dispatch: the sent and received counts together (the split sizes must be known on the host);
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
from moelab.moe.aoe import AoEExperts
from moelab.moe.experts import StackedExperts
from moelab.moe.kernels import sorted_aoe_experts, sorted_experts
from moelab.moe.layer import MoELayer


class A2AStats:
    """What one layer's all-to-alls did since the last ``reset``: rows of this rank's tokens dispatched
    to experts on other ranks, rows of other ranks' tokens this rank's experts received (a rank's
    rows for its own experts never leave it; the combine and the backward pass move the same rows
    back), and seconds spent in all the all-to-alls (the count exchange's included: the first
    collective of a layer's dispatch, where a rank waits for slower ranks to arrive).

    ``seconds``: on CUDA the time between CUDA events recorded on the current stream around each
    all-to-all (device time: a NCCL call returns to the host at launch, so host time would measure
    the launch only), read when ``seconds`` is first asked for after the step (that waits for the
    events; the count exchange's interval ends before the host reads the counts); on the CPU (gloo,
    which returns when the exchange is done) host seconds around each call. Rows are
    counted once per forward: activation checkpointing's recompute moves the same rows again and
    counts nothing (``count_rows`` False then), while every all-to-all's time counts, the recompute's
    and its backward's included."""

    def __init__(self) -> None:
        self.count_rows = True  # False while activation checkpointing recomputes a block
        self.reset()

    def reset(self) -> None:
        self.rows_sent = self.rows_received = 0
        self._host_s = 0.0
        self._events: list = []  # (start, end) CUDA events not yet read

    def add_host(self, seconds: float) -> None:
        self._host_s += seconds

    def add_events(self, start, end) -> None:
        self._events.append((start, end))

    @property
    def seconds(self) -> float:
        for start, end in self._events:
            end.synchronize()
            self._host_s += start.elapsed_time(end) / 1000.0
        self._events = []
        return self._host_s


_now = time.perf_counter  # the host clock (a module attribute, so tests can replace it)


def _timed_all_to_all(out: torch.Tensor, x: torch.Tensor, out_splits, in_splits, group, stats: A2AStats) -> None:
    if x.is_cuda:  # device time between events: the call itself returns at launch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        end.record()
        stats.add_events(start, end)
    else:
        t0 = _now()
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        stats.add_host(_now() - t0)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, stats: A2AStats) -> torch.Tensor:
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    _timed_all_to_all(out, x.contiguous(), out_splits, in_splits, group, stats)
    return out


def _exchange_counts(counts_PL: torch.Tensor, group, stats: A2AStats) -> torch.Tensor:
    """All-to-all of a (P, L) count matrix on the data's device (NCCL moves CUDA tensors, gloo CPU
    ones), timed like the row exchanges: row s of the result is what rank s sends me for each of my
    local experts."""
    recv_PL = torch.empty_like(counts_PL)
    _timed_all_to_all(recv_PL, counts_PL.contiguous(), None, None, group, stats)
    return recv_PL


def _read_counts(send_PL: torch.Tensor, recv_PL: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """Both count matrices on the host: the one host sync of a dispatch (split sizes are host numbers)."""
    both = torch.stack([send_PL, recv_PL]).tolist()
    return both[0], both[1]


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


class _ExpertParallel(nn.Module):
    """The exchange around any stacked experts: rows sorted by (global) expert go to the rank owning
    their expert, come back in the same order. Subclasses hold the local experts and compute."""

    def _init_mesh(self, num_experts: int, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        if num_experts % self.world:
            raise ConfigError("parallel.ep", self.world, f"must divide moe.num_experts={num_experts}")
        self.num_experts, self.local = num_experts, num_experts // self.world
        self.expert_offset = self.rank * self.local
        self.stats = A2AStats()

    def _shard(self, experts: nn.Module, names: tuple[str, ...]) -> None:
        lo, hi = self.expert_offset, self.expert_offset + self.local
        for name in names:
            local = getattr(experts, name).detach()[lo:hi].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False)))

    def wants_count_tensor(self, x_AD: torch.Tensor) -> bool:
        """The counts as a tensor on the data's device: they go straight into the count exchange, and one
        host read after it gives both split sizes (a list would cost a read, a copy back and a read)."""
        return True

    def _dispatch(self, x_AW: torch.Tensor, counts_E: list[int] | torch.Tensor):
        """(rows received for my experts, sorted by local expert; their counts; what _combine needs).
        Counts and the permutation stay on the data's device (as torchtitan's do); the split sizes are
        host numbers, read once (:func:`_read_counts`)."""
        P, L, dev = self.world, self.local, x_AW.device
        if torch.is_tensor(counts_E):
            counts_PL = counts_E.to(device=dev, dtype=torch.long).view(P, L)  # my rows for each rank's experts
        else:
            counts_PL = torch.tensor(counts_E, dtype=torch.long, device=dev).view(P, L)
        recv_PL = _exchange_counts(counts_PL, self.group, self.stats)  # rows each rank sends me, per local expert
        send, recv = _read_counts(counts_PL, recv_PL)
        send_splits = [sum(row) for row in send]
        recv_splits = [sum(row) for row in recv]
        x_RW = _AllToAll.apply(x_AW, recv_splits, send_splits, self.group, self.stats)
        if self.stats.count_rows:
            self.stats.rows_sent += sum(send_splits) - send_splits[self.rank]
            self.stats.rows_received += sum(recv_splits) - recv_splits[self.rank]
        # received rows are [from rank 0: local expert 0..L-1][from rank 1: ...]: regroup by local expert
        src_PL = torch.arange(P, device=dev).repeat_interleave(L)
        exp_PL = torch.arange(L, device=dev).repeat(P)
        R = sum(recv_splits)
        key_R = (exp_PL * P + src_PL).repeat_interleave(recv_PL.flatten(), output_size=R)  # (R,) no host sync
        order = torch.argsort(key_R, stable=True)
        local_counts = [sum(row[e] for row in recv) for e in range(L)]
        return x_RW.index_select(0, order), local_counts, (order, send_splits, recv_splits, x_AW.shape[0])

    def _combine(self, y_sorted: torch.Tensor, ctx) -> torch.Tensor:
        order, send_splits, recv_splits, _ = ctx
        y_RD = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        return _AllToAll.apply(y_RD, send_splits, recv_splits, self.group, self.stats)


class ExpertParallelExperts(_ExpertParallel):
    """The local E / P experts of a StackedExperts, with the all-to-all exchange around them.
    Same call as StackedExperts: ``forward(x_AD, counts_E)`` with rows sorted by (global) expert."""

    def __init__(self, experts: StackedExperts, mesh: DeviceMesh):
        super().__init__()
        self._init_mesh(experts.num_experts, mesh)
        self.d_model, self.ffn_dim, self.activation = experts.d_model, experts.ffn_dim, experts.activation
        self._shard(experts, ("gate_EFD", "up_EFD", "down_EDF"))

    def forward(self, x_AD: torch.Tensor, counts_E: list[int] | torch.Tensor) -> torch.Tensor:
        x_RD, local_counts, ctx = self._dispatch(x_AD, counts_E)
        y = sorted_experts(x_RD, _local(self.gate_EFD), _local(self.up_EFD), _local(self.down_EDF),
                           local_counts, self.activation)
        return self._combine(y, ctx)


class ExpertParallelAoEExperts(_ExpertParallel):
    """Autonomy-of-Experts under expert parallelism. Every token scores every expert by its own
    x W_down, so W_down (small: d_low rows per expert) stays whole on every rank, replicated like
    the dense weights; W_up, W_p and W_o are split over the ranks. A row travels with its cached
    x W_down of its expert (d_model + d_low values), and its gradient comes back the same way, so
    W_down's gradient forms on the token's rank as in one process."""

    def __init__(self, experts: AoEExperts, mesh: DeviceMesh):
        super().__init__()
        self._init_mesh(experts.num_experts, mesh)
        self.d_model, self.d_low, self.d_wide = experts.d_model, experts.d_low, experts.d_wide
        self.activation = experts.activation
        self.wdown_ELD = nn.Parameter(experts.wdown_ELD.detach().clone())
        self.wdown_ELD._moelab_world_mean = True  # replicated: its gradient is averaged over every rank
        self._shard(experts, ("wup_EWL", "wp_EWD", "wo_EDW"))

    def low_rank_all(self, x_TD: torch.Tensor) -> torch.Tensor:
        T = x_TD.shape[0]
        w = self.wdown_ELD.to(x_TD.dtype).reshape(-1, self.d_model)
        return (x_TD @ w.t()).view(T, self.num_experts, self.d_low)

    def active_param_count(self, k: float, scores_all: bool) -> float:
        return AoEExperts.active_param_count(self, k, scores_all)

    def forward(self, x_AD: torch.Tensor, counts_E: list[int] | torch.Tensor,
                low_AL: torch.Tensor | None = None) -> torch.Tensor:
        if low_AL is None:  # router-based AoE: x W_down for each row's own expert, on the token's rank
            w = self.wdown_ELD.to(x_AD.dtype)
            parts, start = [], 0
            for e, n in enumerate(counts_E.tolist() if torch.is_tensor(counts_E) else counts_E):
                parts.append(x_AD[start:start + n] @ w[e].t())
                start += n
            low_AL = torch.cat(parts) if parts else x_AD.new_zeros(0, self.d_low)
        rows, local_counts, ctx = self._dispatch(torch.cat([x_AD, low_AL.to(x_AD.dtype)], dim=1), counts_E)
        x_RD, low_RL = rows[:, :self.d_model], rows[:, self.d_model:]
        y = sorted_aoe_experts(x_RD, low_RL, _local(self.wup_EWL), _local(self.wp_EWD), _local(self.wo_EDW),
                               local_counts, self.activation)
        return self._combine(y, ctx)


def expert_parallel_layers(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, _ExpertParallel)]


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh | None = None) -> int:
    """Shard the routed experts of every MoE layer (MTP modules' included) over ``mesh`` (a 1-D
    expert-parallel mesh; default: all ranks); returns the number of layers sharded. Every rank must
    call it on the same model (same weights)."""
    if mesh is None:  # on the device of the model's weights (its DTensors and the data's)
        device = next(model.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("ep",))
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        router = layer.router_cfg
        if router.n_group > 1 and mesh.size() > 1 and router.n_group % mesh.size() and mesh.size() % router.n_group:
            raise ConfigError("parallel.ep", mesh.size(),
                              f"expert groups (router.n_group={router.n_group}) must align with ranks: one of the "
                              "two must divide the other, so group-limited routing limits the ranks a token visits")
        if isinstance(layer.experts, AoEExperts):
            layer.experts = ExpertParallelAoEExperts(layer.experts, mesh)
        elif isinstance(layer.experts, StackedExperts):
            layer.experts = ExpertParallelExperts(layer.experts, mesh)
        else:
            raise ConfigError("parallel.ep", mesh.size(), f"cannot split {type(layer.experts).__name__} over ranks")
        layer.device_groups = mesh.size()  # DeepSeek's device-level losses count these real devices
    return len(layers)
