"""Numerics guards and mixed precision of the trainer (issue 23.4), in one process:

- a spike rollback forgets exactly the losses of the steps after its checkpoint, also when a skipped
  (non-finite) step lies in between;
- ``parallel.param_dtype: float16`` is refused: moelab has no gradient scaler.
"""

import json
import math
import warnings

import pytest

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.errors import ConfigError
from moelab.train import TrainConfig, Trainer
from moelab.train.config import ParallelConfig
from moelab.train.numerics import SpikeDetector
from moelab.train.trainer import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    lines = [json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(50)), "domain": "w"})
             for i in range(60)]
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _cfg(corpus, **kw):
    model = ModelConfig(vocab_size=300, d_model=32, num_layers=2, max_seq_len=64, dense_ffn_dim=64,
                        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                        moe=MoEConfig(num_experts=4, expert_ffn_dim=32, router=RouterConfig(top_k=2)))
    base = dict(model=model, data=corpus, steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=0,
                eval_batches=1, save_every=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


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
