"""Multi-process training on torch.distributed, applied from outside the single-device model.

A run launched with ``torchrun`` (or ``moelab train --nproc N``, which wraps it) finds
``WORLD_SIZE`` > 1 in its environment; :func:`init_from_env` then joins the process group (gloo on
CPU, NCCL on CUDA) and builds the 2-D mesh (dp, ep) of the config, and :func:`parallelize` applies

- expert parallelism over the ``ep`` dimension (:mod:`moelab.distributed.expert_parallel`), then
- FSDP2 (``fully_shard``): each MoE layer's local experts over ``dp``, every block (the MTP
  modules' included) and the root over all ranks; or, with ``parallel.shard="replicate"``, whole parameters on every
  rank and gradients all-reduced after backward (:func:`sync_gradients`).

Gradients are the mean over all ranks' tokens in both layouts (an expert's gradient already sums
the tokens of its expert-parallel row through the all-to-all, so its reduction over ``dp`` divides
by the whole world size), which makes a step equal one process on the global batch.
"""

from __future__ import annotations

import datetime
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from moelab.errors import ConfigError, MoelabError


def launched_world_size() -> int:
    """The world size torchrun set for this process (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DistEnv:
    """This process's place in the run: rank, world, device and the (dp, ep) mesh."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # (dp, ep)
    flat: DeviceMesh  # all ranks, 1-D
    cfg: object  # ParallelConfig

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        return self.mesh.size(0)

    @property
    def ep(self) -> int:
        return self.mesh.size(1)

    def barrier(self) -> None:
        dist.barrier()

    def wait_for_main(self, hours: float = 24.0) -> None:
        """A barrier for one-time work on rank 0 (data preparation) that may outlast
        parallel.timeout_s: a gloo group with its own long timeout."""
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=hours))
        dist.barrier(group=group)
        dist.destroy_process_group(group)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(t, op=op)
        return t

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values`` (same length on every rank), indexed by rank."""
        t = torch.tensor(values, dtype=torch.float64, device="cpu")  # host numbers: over gloo
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]


def init_from_env(pcfg, num_experts: int | None) -> DistEnv | None:
    """Join the process group torchrun described in the environment; None in a single process."""
    world = launched_world_size()
    if world <= 1 and not dist.is_initialized():
        return None
    dp, ep = pcfg.mesh_shape(world if not dist.is_initialized() else dist.get_world_size(), num_experts)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and pcfg.backend != "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl":  # CUDA tensors over NCCL (expert counts too); the small CPU tensors (metrics) over gloo
        backend = "cpu:gloo,cuda:nccl"
    timeout = datetime.timedelta(seconds=pcfg.timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    flat = mesh._flatten("dp_ep") if hasattr(mesh, "_flatten") else init_device_mesh(device.type, (dp * ep,))
    for group in {*mesh.get_all_groups(), flat.get_group()}:
        set_group_timeout(group, timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, mesh, flat, pcfg)


def set_group_timeout(group, timeout: datetime.timedelta) -> None:
    """``timeout`` for every collective of ``group``, on each of its backends (gloo, NCCL).

    NOTE: init_device_mesh (torch 2.13) creates the sub-groups of a mesh (dp and ep rows smaller than
    the world) with torch's default timeout (30 minutes for gloo, 10 for NCCL), not the timeout the
    process group was started with, so a rank stalled in the forward would keep its dp or ep peers
    waiting that long. torch has no public setter; its private one also takes the NCCL watchdog."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timeout, group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parallelize(model: nn.Module, env: DistEnv) -> None:
    """Expert parallelism, then FSDP2 (or replication) on ``model`` in place; every rank must call it
    on identical weights (same seed or the same loaded checkpoint)."""
    from moelab.distributed.expert_parallel import apply_expert_parallel, expert_parallel_layers

    pcfg = env.cfg
    if env.ep > 1:
        apply_expert_parallel(model, env.mesh["ep"])
    if pcfg.shard == "replicate":
        model._moelab_replicated = True
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # NOTE: a block returns (hidden, Routing); FSDP2 warns that the Routing's tensors are views. No
    # caller modifies a block's outputs in place, which is what the warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[pcfg.param_dtype], reduce_dtype=_DTYPES[pcfg.reduce_dtype])
    kw = dict(mp_policy=mp, reshard_after_forward=pcfg.reshard_after_forward)
    for experts in expert_parallel_layers(model):
        # replicated parameters inside (AoE's W_down) are left to sync_gradients: a mean over all ranks
        ignored = {p for p in experts.parameters() if getattr(p, "_moelab_world_mean", False)}
        fully_shard(experts, mesh=env.mesh["dp"], ignored_params=ignored or None, **kw)
        # its gradient already sums the tokens of its ep row: the mean over all ranks divides by world
        experts.set_gradient_divide_factor(float(env.world))
        # gloo has no pre-multiplied sum: plain sums with the division after them.
        # NOTE: only when dp > 1: on a 1-rank mesh FSDP2 (torch 2.13) skips the collective and divides
        # by the factor, then divides a second time when sum reduction is forced (gradients 1/world^2).
        if env.device.type == "cpu" and env.dp > 1:
            experts.set_force_sum_reduction_for_comms(True)
    # an MTP module's block is its own unit; its norms and projection stay with the root, because the
    # model applies the module's final norm from outside the module's forward (in the shared head)
    for block in [*model.blocks, *(m.block for m in (model.mtp or []))]:
        fully_shard(block, mesh=env.flat, **kw)
    fully_shard(model, mesh=env.flat, **kw)


def _replication(p: torch.Tensor, env: DistEnv, replicated: bool) -> int:
    """On how many ranks this parameter's local tensor is repeated (1: a shard nobody else holds)."""
    if _world_mean(p):
        return env.world
    if not replicated:
        return 1
    return env.dp if isinstance(p, DTensor) else env.world  # experts are distinct across ep


def _world_mean(p: torch.Tensor) -> bool:
    return getattr(p, "_moelab_world_mean", False)


@torch.no_grad()
def sync_gradients(model: nn.Module, env: DistEnv) -> None:
    """Replicated layout (DDP): average every gradient over the ranks holding the same parameter
    (the whole world; an expert's gradient sums its ep row already, so it is summed over dp and
    divided by the world size). One flat all-reduce per group of ranks. Under FSDP2 only the
    parameters it leaves out (AoE's replicated W_down) are averaged here."""
    if not getattr(model, "_moelab_replicated", False):
        own = [p.grad for p in model.parameters() if p.grad is not None and _world_mean(p)]
        if own:
            flat = torch.cat([g.reshape(-1) for g in own])
            dist.all_reduce(flat)
            flat /= env.world
            for g, chunk in zip(own, flat.split([g.numel() for g in own])):
                g.copy_(chunk.view_as(g))
        return
    dense = [p.grad for p in model.parameters() if p.grad is not None and not isinstance(p, DTensor)]
    experts = [p.grad.to_local() for p in model.parameters() if p.grad is not None and isinstance(p, DTensor)]
    for grads, group in ((dense, None), (experts, env.mesh["dp"].get_group())):
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= env.world
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, env: DistEnv) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model however it is split: the squared norms of
    the local shards, each counted once (a replicated tensor divided by its number of copies),
    summed over all ranks. Returns the global norm; scales the gradients by
    min(1, max_norm / (norm + 1e-6)) as torch does, and not at all when the norm is not finite (the
    step is then skipped or stopped, and the diagnosis must see which gradient went non-finite, not
    every gradient times NaN)."""
    replicated = getattr(model, "_moelab_replicated", False)
    grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64, device=env.device)
    for p, g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        sq += local.double().pow(2).sum() / _replication(p, env, replicated)
    dist.all_reduce(sq)
    norm = sq.sqrt().float()
    if math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        coef = torch.where(norm.isfinite(), coef, torch.ones_like(coef))  # no host sync
        for _, g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return norm


def check_batch(batch_size: int, world: int) -> int:
    if batch_size % world:
        raise ConfigError("batch_size", batch_size, f"must be divisible by the {world} processes (each takes an "
                                                    "equal share of every global micro-batch)")
    return batch_size // world


class RankFailure(MoelabError):
    """A rank stopped the run (its error is printed by that rank)."""
