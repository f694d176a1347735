"""Numerics guards and mixed precision of the trainer (issue 23.4), in one process:

- a spike rollback forgets exactly the losses of the steps after its checkpoint, also when a skipped
  (non-finite) step lies in between;
- ``parallel.param_dtype: float16`` is refused: moelab has no gradient scaler;
- a non-finite gradient is named by the diagnosis also when clipping is on (clipping by a NaN norm
  made every gradient NaN first);
- ranks that run different modules in the diagnosis forward (a few-token MoE layer takes the decode
  path, whose experts' forward does not run) still reduce their verdicts and agree on the names.
"""

import json
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from moelab.errors import ConfigError
from moelab.train import Trainer
from moelab.train.config import ParallelConfig
from moelab.train.numerics import SpikeDetector
from moelab.train.trainer import read_metrics
from tests.helpers import small_train_config, write_word_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"))


def _cfg(corpus, **kw):
    return small_train_config(corpus, **kw)


def _poison_steps(trainer, factors: dict[int, float]) -> None:
    """The loss of step s (1-based) multiplied by ``factors[s]``, once (NaN: a non-finite step)."""
    real_step, fired = trainer.train_step, set()

    def step(batches):
        s = trainer.step + 1
        if s not in factors or s in fired:
            return real_step(batches)
        fired.add(s)
        real_forward = trainer.model.forward

        def forward(*a, **kw):
            out = real_forward(*a, **kw)
            out.loss = out.loss * factors[s]
            return out

        trainer.model.forward = forward
        try:
            return real_step(batches)
        finally:
            del trainer.model.forward

    trainer.train_step = step


def test_a_rollback_forgets_only_the_losses_after_its_checkpoint(corpus, tmp_path):
    """Checkpoint at step 6, step 8 non-finite (skipped: no loss in the history), step 9 a spike: the
    rollback to step 6 must drop step 7's loss only. It trimmed ``from_step - 1 - 6`` = 2 losses, step
    6's among them, as if every step had one."""
    cfg = _cfg(corpus, steps=10, save_every=6, spike_factor=3.0, spike_action="rollback", nonfinite="skip",
               grad_clip=1.0)
    t = Trainer(cfg, tmp_path / "run")
    _poison_steps(t, {8: float("nan"), 9: 10.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit()
    said = [str(w.message) for w in caught]
    assert any("step 8: non-finite" in m for m in said) and any("rolled back to step_000006" in m for m in said)
    recs = read_metrics(tmp_path / "run")
    assert [r["from_step"] for r in recs if r["kind"] == "rollback"] == [9]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))
    # the history is every logged loss, in order: steps 1-6 from before the rollback, 7-10 after it
    assert t.spikes.history == [r["loss"] for r in train]
    assert t.spikes.steps == list(range(1, 11))


def test_spike_detector_drops_by_step():
    d = SpikeDetector(3.0, 20)
    for step, loss in [(1, 2.0), (2, 1.9), (4, 1.8), (5, 1.7)]:  # step 3 skipped
        assert d.check(loss, step) is None
    d.drop_after(3)
    assert d.history == [2.0, 1.9] and d.steps == [1, 2]
    assert math.isclose(sum(d.history), 3.9)


def test_float16_compute_is_refused_without_a_gradient_scaler():
    with pytest.raises(ConfigError, match=r"parallel\.param_dtype.*gradient scaler.*bfloat16"):
        ParallelConfig(param_dtype="float16")
    assert ParallelConfig(param_dtype="bfloat16").param_dtype == "bfloat16"


def nan_gradient_at(trainer, step: int, name: str, on=lambda: True) -> None:
    """At step ``step`` (1-based) the gradient of parameter ``name`` gets a NaN in its first row, through a
    tensor hook (so before any reduction, clipping or diagnosis), where ``on()`` holds (a rank)."""
    real_step = trainer.train_step

    def train_step(batches):
        if trainer.step + 1 != step or not on():
            return real_step(batches)
        param = dict(trainer.model.named_parameters())[name]
        handle = param.register_hook(lambda g: g.index_fill(0, torch.tensor([0], device=g.device), float("nan")))
        try:
            return real_step(batches)
        finally:
            handle.remove()

    trainer.train_step = train_step


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_nonfinite_gradient_is_named_also_when_clipping(grad_clip, corpus, tmp_path):
    """Review item 1: clip_grad_norm_ scaled every gradient by the NaN clip factor of a NaN norm (also with
    grad_clip 0: limit inf, inf / NaN = NaN) before the diagnosis looked, which then named the first
    parameter of the model. Now a non-finite norm scales nothing."""
    cfg = _cfg(corpus, steps=3, save_every=0, nonfinite="skip", grad_clip=grad_clip)
    t = Trainer(cfg, tmp_path / "run")
    nan_gradient_at(t, 2, "blocks.1.attn.o_proj.weight")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit()
    said = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(said) == 1 and "first non-finite gradient: blocks.1.attn.o_proj.weight;" in said[0], said
    info = json.loads((tmp_path / "run" / "diagnostics" / "step_000002" / "diagnosis.json").read_text())
    assert info["first_nonfinite_gradient"] == "blocks.1.attn.o_proj.weight"
    assert info["first_nonfinite_parameter"] is None and info["first_nonfinite_output"] is None
    recs = [r for r in read_metrics(tmp_path / "run") if r["kind"] in ("train", "skipped")]
    assert [(r["kind"], r["step"]) for r in recs] == [("train", 1), ("skipped", 2), ("train", 3)]
    assert math.isfinite(recs[1]["loss"]) and not math.isfinite(recs[1]["grad_norm"])


class _ThreadRanks:
    """``world`` ranks as threads of this process: ``all_reduce`` as gloo does it, refusing tensors of
    different sizes on different ranks (gloo errors or hangs)."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world

    def env(self, rank: int):
        return SimpleNamespace(rank=rank, world=self.world, is_main=rank == 0,
                               all_reduce=lambda t, op=dist.ReduceOp.SUM: self._all_reduce(rank, t, op))

    def _all_reduce(self, rank: int, t: torch.Tensor, op) -> torch.Tensor:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        slots = list(self.slots)
        self.barrier.wait()
        if len({tuple(s.shape) for s in slots}) > 1:
            raise RuntimeError(f"all_reduce of different sizes on the ranks: {[tuple(s.shape) for s in slots]}")
        stacked = torch.stack(slots)
        if op == dist.ReduceOp.SUM:
            t.copy_(stacked.sum(0))
        elif op == dist.ReduceOp.MAX:
            t.copy_(stacked.amax(0))
        elif op == dist.ReduceOp.MIN:
            t.copy_(stacked.amin(0))
        else:
            raise NotImplementedError(op)
        return t


def test_diagnose_reduces_per_module_verdicts_when_ranks_run_different_modules(corpus, tmp_path):
    """Review item 3: rank 0's share has 4 tokens (8 assignments: the no-grad decode path, where the
    experts module's own forward, and so its hook, does not run), rank 1's 32. The verdicts were lists in
    execution order, of different lengths on the two ranks: the all-reduce failed (or hung, on gloo).
    One verdict per module (the same modules on every rank) is reduced; both ranks name the first
    non-finite output (rank 0's only), gradient (rank 1's only) and weight (rank 0's only)."""
    from moelab.model import build_model
    from moelab.train.numerics import diagnose

    torch.manual_seed(0)
    base = build_model(_cfg(corpus).model)
    models = [build_model(_cfg(corpus).model) for _ in range(2)]
    for m in models:
        m.load_state_dict(base.state_dict())
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
    # rank 0: the attention of block 0 gives NaN, and a router weight is NaN; rank 1: a NaN gradient
    models[0].blocks[0].attn.register_forward_hook(lambda mod, args, out: out * float("nan"))
    with torch.no_grad():
        models[0].blocks[1].ffn.router.weight[0, 0] = float("nan")
    models[1].norm.weight.grad[3] = float("nan")
    ids = [torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(n)) for n in (4, 32)]
    ranks = _ThreadRanks(2)

    def run(rank):
        return diagnose(models[rank], ids[rank], ids[rank], tmp_path / f"d{rank}", 1, "test", write=rank == 0,
                        env=ranks.env(rank))

    with ThreadPoolExecutor(2) as pool:
        infos = list(pool.map(run, range(2)))
    for info in infos:
        assert info["first_nonfinite_output"] == "blocks.0.attn", info
        assert info["first_nonfinite_gradient"] == "norm.weight", info
        assert info["first_nonfinite_parameter"] == "blocks.1.ffn.router.weight", info


def test_a_spike_with_no_checkpoint_yet_warns_and_training_goes_on(corpus, tmp_path):
    """The rollback asks choose_checkpoint (rank 0's listing, shared with every rank; review item 5)
    whether there is a checkpoint: with none yet, a warning, and the run goes on."""
    cfg = _cfg(corpus, steps=8, save_every=0, spike_factor=3.0, spike_action="rollback")
    t = Trainer(cfg, tmp_path / "run")
    _poison_steps(t, {7: 10.0})
    with pytest.warns(UserWarning, match="step 7: loss spike .*no checkpoint to roll back to yet"):
        t.fit()
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 9))
    assert t.rollbacks == 0 and not any(r["kind"] == "rollback" for r in recs)
