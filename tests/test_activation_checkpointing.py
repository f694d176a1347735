"""Activation checkpointing on/off: identical losses, counters, metrics, bias updates, gradients;
and determinism under a seed."""

import pytest
import torch

from moelab.config import RouterConfig
from moelab.model import build_model
from moelab.moe import update_router_biases
from tests.helpers import small_config

ROUTERS = {
    "noisy_topk": dict(type="noisy_topk", top_k=2, jitter_eps=0.1, importance_loss_coef=0.1, noisy_load_loss_coef=0.1,
                       capacity_factor=1.0),
    "deepseek_v3": dict(type="deepseek_v3", top_k=2, n_group=2, topk_group=1, bias_update_rate=1e-3,
                        seq_balance_coef=1e-4, z_loss_coef=1e-3),
    "expert_choice": dict(type="expert_choice", top_k=2, entropy_loss_coef=1e-4),
    "top_p": dict(type="top_p", top_p=0.5, capacity_factor=1.0, drop_priority="score"),
}


def _run(router_kw, checkpointing, steps=2):
    cfg = small_config(router=RouterConfig(**router_kw))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.activation_checkpointing = checkpointing
    calls = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 12))
    record = []
    for _ in range(steps):
        out = model(ids, labels=ids)
        out.loss.backward()
        layers = model.moe_layers()
        record.append({
            "loss": out.loss.detach(), "aux": {k: v.detach() for k, v in out.aux_losses.items()},
            "counts": [layer.last_counts_E.clone() for layer in layers],
            "accum": [layer.load_accum_E.clone() for layer in layers],
            "metrics": [dict(layer.last_metrics) for layer in layers],
            "grads": [p.grad.clone() for p in model.parameters()],
        })
        opt.step()
        opt.zero_grad()
        update_router_biases(model)
        record[-1]["bias"] = [b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    biases = [b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    return record, biases, len(calls)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_checkpointing_on_off_identical(name):
    off, bias_off, calls_off = _run(ROUTERS[name], False)
    on, bias_on, calls_on = _run(ROUTERS[name], True)
    assert calls_on == 2 * calls_off  # the routers really ran again in backward
    for a, b in zip(off, on):
        assert torch.equal(a["loss"], b["loss"])
        assert a["aux"].keys() == b["aux"].keys() and all(torch.equal(a["aux"][k], b["aux"][k]) for k in a["aux"])
        assert all(torch.equal(x, y) for x, y in zip(a["counts"], b["counts"]))
        assert all(torch.equal(x, y) for x, y in zip(a["accum"], b["accum"]))  # not counted twice
        for ma, mb in zip(a["metrics"], b["metrics"]):
            assert ma.keys() == mb.keys()
            for k in ma:
                va, vb = ma[k], mb[k]
                assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k
        assert all(torch.equal(x, y) for x, y in zip(a["grads"], b["grads"]))
        assert all(torch.equal(x, y) for x, y in zip(a["bias"], b["bias"]))
    assert all(torch.equal(x, y) for x, y in zip(bias_off, bias_on))
    if name == "deepseek_v3":
        assert on[0]["bias"][0].abs().max().item() == pytest.approx(1e-3)  # moved by gamma after step 1


def test_load_accumulator_counts_each_training_token_once():
    record, _, _ = _run(ROUTERS["deepseek_v3"] | {"bias_update_rate": 0.0}, True, steps=1)
    # 2 x 12 tokens x top-2 = 48 assignments per layer per forward
    assert [int(c.sum()) for c in record[0]["accum"]] == [48, 48]


@pytest.mark.parametrize("name", ["noisy_topk", "top_p"])
def test_deterministic_under_a_seed(name):
    a, bias_a, _ = _run(ROUTERS[name], False)
    b, bias_b, _ = _run(ROUTERS[name], False)
    for x, y in zip(a, b):
        assert torch.equal(x["loss"], y["loss"])
        assert all(torch.equal(g, h) for g, h in zip(x["grads"], y["grads"]))
