"""Expert parallelism and the MoE layer off the CPU, checked without a GPU (issue 23.1).

Two ways to see a tensor created on the wrong device on a CPU-only machine:

- the data on a fake CUDA device (``torch._subclasses.FakeTensorMode``: shapes and devices, no
  values): the expert-parallel layer's forward and backward with the all-to-alls replaced by a
  one-rank copy that checks every tensor it is handed is on the data's device;
- the data on the CPU and the *default* device set to ``meta``: a tensor created without
  ``device=`` lands on meta and the first op mixing it with the data fails, so every implicit
  device shows, with real values to compare.

One process: a world-1 gloo group (for the DeviceMesh the expert layer shards over) that each test
joins and leaves.
"""

import ast
import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moelab
from moelab.config import AoEConfig, RouterConfig
from moelab.distributed import expert_parallel as ep_mod
from moelab.moe.experts import StackedExperts
from moelab.moe.layer import MoELayer
from tests.helpers import small_config


@pytest.fixture
def world1():
    """A one-process group and its 1-D expert-parallel mesh, torn down after the test."""
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
    finally:
        dist.destroy_process_group()


def _experts(E=4, D=16, F=8) -> StackedExperts:
    torch.manual_seed(0)
    ex = StackedExperts(E, D, F, "silu")
    for p in ex.parameters():
        nn.init.normal_(p, std=0.3)
    return ex


class _FakeEvent:
    """torch.cuda.Event on a machine without CUDA: every timed interval lasts 2 ms."""

    def __init__(self, enable_timing=False):
        assert enable_timing

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return 2.0


@pytest.mark.parametrize("device", ["meta", "cuda"])
def test_expert_parallel_keeps_every_tensor_on_the_data_device(device, world1, monkeypatch):
    """The bug of issue 23.1: the permutation was built on the CPU, so ``index_copy`` failed on CUDA
    data at the first forward. Here the data, the weights and every tensor handed to an all-to-all
    are on ``meta`` (forward and backward) or on a fake CUDA device (forward: the autograd engine of
    a CPU-only torch aborts on any fake CUDA tensor that records autograd history), where the
    seconds come from CUDA events."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    counts_E = [3, 0, 5, 2]
    seen = []

    def all_to_all_single(out, inp, out_splits=None, in_splits=None, group=None):  # one rank, no values to copy
        assert out.shape == inp.shape
        seen.append((out.device.type, inp.device.type))

    def read_counts(send_PL, recv_PL):  # the values no meta or fake tensor holds: what one rank sends and receives
        seen.append((send_PL.device.type, recv_PL.device.type, "read"))
        return [list(counts_E)], [list(counts_E)]

    monkeypatch.setattr(ep_mod.dist, "all_to_all_single", all_to_all_single)
    monkeypatch.setattr(ep_mod, "_read_counts", read_counts)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    layer = ep_mod.ExpertParallelExperts(_experts(), world1)
    shapes = {name: ep_mod._local(getattr(layer, name)).shape for name in ("gate_EFD", "up_EFD", "down_EDF")}
    meta = device == "meta"
    if not meta:  # the experts' math is checked on meta; a fake CUDA tensor cannot even be sliced on this torch
        monkeypatch.setattr(ep_mod, "sorted_experts", lambda x, gate, up, down, counts, act: x.new_empty(x.shape))
    with torch.device("meta") if meta else FakeTensorMode(), torch.set_grad_enabled(meta):
        for name, shape in shapes.items():  # the local experts, on the data's device
            setattr(layer, name, nn.Parameter(torch.randn(shape, device=device), requires_grad=meta))
        x = torch.randn(sum(counts_E), 16, device=device, requires_grad=meta)
        assert layer.wants_count_tensor(x)  # the counts come as a tensor on the data's device
        y = layer(x, torch.tensor(counts_E, device=device))
        assert y.device.type == device and y.shape == (10, 16)
        if device == "meta":
            y.sum().backward()
            assert x.grad.device.type == "meta" and layer.gate_EFD.grad.device.type == "meta"
    calls = 5 if device == "meta" else 3  # the count exchange, dispatch and combine, and their backward
    assert seen[1] == (device, device, "read") and len(seen) == 1 + calls
    assert set(seen[:1] + seen[2:]) == {(device, device)}
    if device == "cuda":  # timed by CUDA events (2 ms each here), not by the host clock
        assert layer.stats.seconds == pytest.approx(calls * 0.002)


def test_expert_parallel_creates_no_tensor_on_an_implicit_device(world1):
    """Real values on the CPU, ``meta`` as the default device: the one-rank expert-parallel layer
    equals the plain experts, forward and backward, so no tensor was created without ``device=``."""
    ref = _experts()
    layer = ep_mod.ExpertParallelExperts(_experts(), world1)
    counts_E = [3, 0, 5, 2]
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = ref(xa, counts_E)
    want.pow(2).sum().backward()
    with torch.device("meta"):
        got = layer(xb, counts_E)
        got.pow(2).sum().backward()
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(layer.gate_EFD.grad.to_local(), ref.gate_EFD.grad)


ROUTERS = {
    "topk": {"router": RouterConfig(top_k=2, load_balance_coef=0.01, z_loss_coef=1e-3)},
    "expert_choice": {"router": RouterConfig(type="expert_choice", top_k=2)},
    "deepseek_v3": {"router": RouterConfig(type="deepseek_v3", top_k=2, n_group=2, topk_group=1,
                                           seq_balance_coef=0.01)},
    "deepseek_v2": {"router": RouterConfig(type="deepseek_v2", top_k=2, n_group=4, topk_group=2,
                                           expert_balance_coef=0.1, device_balance_coef=0.2, comm_balance_coef=0.3)},
    "top_p": {"router": RouterConfig(type="top_p", top_k=2)},
    "capacity": {"router": RouterConfig(top_k=2, capacity_factor=1.0)},
    "aoe": {"router": RouterConfig(top_k=2), "aoe": AoEConfig(d_low=8)},
}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_moe_layer_creates_no_tensor_on_an_implicit_device(name):
    """The device audit of moelab/moe at run time: each router family's layer, forward (with padding
    masked) and backward, gives the same numbers with ``meta`` as the default device."""
    torch.manual_seed(0)
    layer = MoELayer(small_config(**ROUTERS[name])).train()
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False

    def run():
        xi = x.clone().requires_grad_(True)
        y, routing = layer(xi, mask)
        (y.pow(2).sum() + sum(routing.aux_losses.values(), y.new_zeros(()))).backward()
        grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        layer.zero_grad(set_to_none=True)
        return y.detach(), xi.grad, grads

    want = run()
    with torch.device("meta"):
        got = run()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b)


FACTORIES = {"arange", "tensor", "as_tensor", "zeros", "ones", "empty", "full", "linspace", "randn", "rand",
             "randint", "randperm", "eye"}


def test_every_tensor_created_in_moe_and_distributed_names_its_device():
    """The static half of the audit: outside module constructors (whose parameters follow the model's
    device), every torch factory call in moelab/moe and moelab/distributed passes ``device=``, and not
    ``device=None`` (the default device again)."""
    root = Path(moelab.__file__).parent
    missing = []
    for path in [*(root / "moe").rglob("*.py"), *(root / "distributed").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or fn.name == "__init__":
                continue
            for call in ast.walk(fn):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
                        and call.func.attr in FACTORIES
                        and not any(k.arg == "device" and not (isinstance(k.value, ast.Constant) and k.value.value is None)
                                    for k in call.keywords)):
                    missing.append(f"{path.relative_to(root)}:{call.lineno} torch.{call.func.attr}")
    assert not missing, missing


@pytest.mark.parametrize("checkpointing", [False, True])
def test_all_to_all_seconds_count_the_recompute_and_its_backward(checkpointing, world1, monkeypatch):
    """Issue 23.4: activation checkpointing recomputes a block in backward, two more all-to-alls per
    MoE layer whose time is real; their rows are the forward's again. A clock that advances 1 s per
    reading makes every timed all-to-all last 1 s: 5 per layer without checkpointing (the count
    exchange, dispatch and combine, and the backward of the last two; the count exchange, where a rank
    waits for slower ones, was not timed: 4), 8 with it (the recompute exchanges counts again)."""
    import dataclasses

    from moelab.model import build_model

    clock = iter(range(10**6))
    monkeypatch.setattr(ep_mod, "_now", lambda: float(next(clock)), raising=False)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(small_config(), activation_checkpointing=checkpointing)).train()
    assert ep_mod.apply_expert_parallel(model, world1) == 2
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    model(ids, labels=ids).loss.backward()
    layers = ep_mod.expert_parallel_layers(model)
    assert [layer.stats.seconds for layer in layers] == [8.0 if checkpointing else 5.0] * 2
    assert [layer.stats.rows_sent for layer in layers] == [0, 0]  # one rank: no row leaves it


def test_an_expert_parallel_dispatch_reads_the_counts_to_the_host_once(world1, monkeypatch):
    """Review item 7: the counts went to the host (``tolist``), back to the device (``torch.tensor``) for the
    exchange, and the received ones to the host again: three host syncs per MoE layer on CUDA. Now
    the count tensor is exchanged as it is and both matrices are read in one ``tolist``."""
    from moelab.moe.dispatch import dispatch_combine
    from moelab.moe.routing import Routing

    layer = ep_mod.ExpertParallelExperts(_experts(), world1)
    reads = []
    real_tolist = torch.Tensor.tolist

    def tolist(t):
        reads.append(tuple(t.shape))
        return real_tolist(t)

    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 16, generator=g)
    logits = torch.randn(6, 4, generator=g)
    weight, idx = logits.softmax(-1).topk(2)
    routing = Routing.from_topk(idx, weight, logits, logits.softmax(-1))
    want = dispatch_combine(_experts(), x, routing)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    got = dispatch_combine(layer, x, routing)
    monkeypatch.undo()
    assert reads == [(2, 1, 4)]  # sent and received counts (P=1, L=4), together
    torch.testing.assert_close(got, want)
