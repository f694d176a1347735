"""torch.compile of the blocks (MoETransformer.compile_blocks): compiled equals eager for training
(loss and every gradient) and for cached decoding, and a compiled decode step does not recompile
when the router picks other experts.

Most tests use the "aot_eager" backend: it runs dynamo's capture and AOTAutograd's joint graph (what
can break) without inductor's C++ code generation (which takes about a minute per model on CPU); one
slow test runs inductor itself.
"""

import pytest
import torch

from moelab.inference.generate import generate_ids
from moelab.model import build_model
from moelab.moe.dispatch import _decode_combine, _gathered_combine
from moelab.moe.experts import StackedExperts
from moelab.moe.routing import Routing, count_ids
from tests.helpers import small_config


def _counter():
    import torch._dynamo.testing

    return torch._dynamo.testing.CompileCounterWithBackend("aot_eager")


def _pair(seed=0, **moe):
    torch.manual_seed(seed)
    eager = build_model(small_config(**moe))
    compiled = build_model(small_config(**moe))
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


@pytest.mark.parametrize("moe", [{}, {"num_shared_experts": 1, "shared_expert_ffn_dim": 16, "shared_expert_gate": True},
                                 {"router": {"type": "deepseek_v3", "top_k": 2}}])
def test_compiled_training_step_equals_eager(moe):
    from moelab.config import RouterConfig

    if isinstance(moe.get("router"), dict):
        moe = {**moe, "router": RouterConfig(**moe["router"])}
    eager, compiled = _pair(**moe)
    compiled.compile_blocks(backend=_counter())
    ids = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(1))
    outs = []
    for m in (eager, compiled):
        m.train()
        out = m(ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    assert outs[1].aux_losses.keys() == outs[0].aux_losses.keys()
    grads = dict(eager.named_parameters())
    n = 0
    for name, p in compiled.named_parameters():
        ref = grads[name].grad
        if ref is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6, msg=name)
        n += 1
    assert n > 10
    # the layers' own state moved the same way (load counters for the aux-free bias, metrics)
    for a, b in zip(eager.moe_layers(), compiled.moe_layers()):
        assert torch.equal(a.load_accum_E, b.load_accum_E)
        assert a.last_metrics["dropped_frac"] == b.last_metrics["dropped_frac"]


def test_compiled_decoding_equals_eager_and_does_not_recompile_per_expert_choice():
    eager, compiled = _pair(seed=3)
    counter = _counter()
    compiled.compile_blocks(backend=counter, dynamic=True)
    prompt = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    ref = generate_ids(eager, prompt, 20)
    out = generate_ids(compiled, prompt, 20)
    assert torch.equal(out, ref)
    frames = counter.frame_count
    # 30 more tokens pick many other expert sets and cache lengths: no new graph
    prompt2 = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    assert torch.equal(generate_ids(compiled, prompt2, 30), generate_ids(eager, prompt2, 30))
    assert counter.frame_count == frames


def test_gathered_decode_path_equals_the_eager_decode_path():
    torch.manual_seed(0)
    ex = StackedExperts(8, 16, 12)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 16)
    logits = torch.randn(3, 8)
    w, idx = logits.softmax(-1).topk(2, dim=-1)
    routing = Routing.from_topk(idx, w, logits, logits.softmax(-1))
    with torch.no_grad():
        torch.testing.assert_close(_gathered_combine(ex, x, routing), _decode_combine(ex, x, routing))


def test_count_ids_equals_bincount_under_compile():
    idx = torch.tensor([3, 0, 3, 1, 3])

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(i):
        return count_ids(i, 6)

    assert f(idx).tolist() == torch.bincount(idx, minlength=6).tolist() == [1, 1, 0, 3, 0, 0]


def test_trainer_compile_flag_matches_eager(tmp_path, monkeypatch):
    """``TrainConfig.compile`` compiles the blocks and trains to the same losses as eager."""
    from moelab.model import MoETransformer
    from moelab.train import TrainConfig, train
    from moelab.train.trainer import read_metrics

    counter = _counter()
    orig = MoETransformer.compile_blocks
    monkeypatch.setattr(MoETransformer, "compile_blocks", lambda self, **kw: orig(self, backend=counter))
    text = tmp_path / "c.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i + j) % 17} x{i % 5}" for i in range(200)) for j in range(20)))
    losses = []
    for flag in (False, True):
        model_cfg = small_config()
        model_cfg.vocab_size = 320
        cfg = TrainConfig(model=model_cfg, data=str(text), steps=3, batch_size=2, seq_len=32, warmup_steps=1,
                          eval_every=0, progress=False, compile=flag)
        train(cfg, tmp_path / f"run{flag}")
        losses.append([r["loss"] for r in read_metrics(tmp_path / f"run{flag}") if r.get("kind") == "train"])
    assert counter.frame_count > 0
    assert len(losses[0]) == 3
    for a, b in zip(*losses):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))


@pytest.mark.slow
def test_inductor_compiled_decoding_equals_eager():
    torch.manual_seed(0)
    cfg = small_config()
    cfg.num_layers = 1
    eager = build_model(cfg)
    compiled = build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks(dynamic=True)
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(generate_ids(compiled, prompt, 12), generate_ids(eager, prompt, 12))


def test_a_cached_decode_step_of_a_block_has_no_graph_break():
    """Unpadded decoding: no host sync in attention (cache validity is not consulted without padding)
    and the gathered expert path, so dynamo captures a whole block as one graph."""
    from moelab.layers.rope import model_rope_cos_sin

    torch.manual_seed(0)
    model = build_model(small_config()).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 5)), cache=cache)
        block = model.blocks[0]
        pos = torch.tensor([5])
        cos, sin = model_rope_cos_sin(model.config, pos, 6)
        x = torch.randn(1, 1, model.config.d_model)
        explained = torch._dynamo.explain(block)(x, cos, sin, pos, cache.layers[0])
    assert explained.graph_break_count == 0, [b.reason[:120] for b in explained.break_reasons]
