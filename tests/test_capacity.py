"""Capacity, dropping priorities, dropped tokens = residual, dropless == no-overflow capacity."""

import pytest
import torch

from moelab.config import RouterConfig
from moelab.model import build_model
from moelab.moe.dispatch import capacity_keep_mask, dispatch_combine, expert_capacity
from moelab.moe.experts import reference_moe
from moelab.moe.layer import MoELayer
from moelab.moe.routing import Routing
from tests.helpers import small_config


def test_capacity_formula():
    assert expert_capacity(1.25, 100, 2, 8) == 32  # ceil(31.25)
    assert expert_capacity(1.0, 64, 2, 8) == 16
    assert expert_capacity(0.5, 10, 1, 4) == 2  # ceil(1.25)


def _routing(token, expert, weight, T, E):
    logits = torch.zeros(T, E)
    return Routing(torch.tensor(token), torch.tensor(expert), torch.tensor(weight), logits, logits.softmax(-1), E)


def test_position_priority_is_the_flattened_order_sequence_by_sequence():
    # 2 sequences x 3 positions, top-1, all to expert 0, capacity 2. OpenMoE's Top2Router and flaxformer
    # count slots in the flattened (sequence-major) token order: the first sequence's first two tokens.
    r = _routing([0, 1, 2, 3, 4, 5], [0] * 6, [0.1, 0.9, 0.8, 0.7, 0.6, 0.5], T=6, E=2)
    keep = capacity_keep_mask(r, 2, "position", seq_len=3)
    assert keep.tolist() == [True, True, False, False, False, False]
    assert capacity_keep_mask(r, 6, "position", seq_len=3).all()


def test_position_global_priority_keeps_earlier_positions_of_every_sequence():
    # the same routing: position 0 of both sequences
    r = _routing([0, 1, 2, 3, 4, 5], [0] * 6, [0.1, 0.9, 0.8, 0.7, 0.6, 0.5], T=6, E=2)
    keep = capacity_keep_mask(r, 2, "position_global", seq_len=3)
    assert keep.tolist() == [True, False, False, True, False, False]
    assert capacity_keep_mask(r, 6, "position_global", seq_len=3).all()


def test_score_priority_is_batch_prioritised_routing():
    # top-2 over 3 experts, 3 tokens, capacity 1. First choices: t0 -> e0 (0.5), t1 -> e0 (0.9),
    # t2 -> e1 (0.6). Second choices: t0 -> e1 (0.4), t1 -> e2 (0.05), t2 -> e2 (0.3).
    token = [0, 0, 1, 1, 2, 2]
    expert = [0, 1, 0, 2, 1, 2]
    weight = [0.5, 0.4, 0.9, 0.05, 0.6, 0.3]
    r = _routing(token, expert, weight, T=3, E=3)
    keep = capacity_keep_mask(r, 1, "score", seq_len=3)
    # e0: both 1st choices, t1 (top gate 0.9) beats t0 (0.5); e1: t2's 1st choice beats t0's 2nd
    # choice (1st choices go first); e2: both 2nd choices, t1's top gate 0.9 beats t2's 0.6
    assert keep.tolist() == [False, False, True, True, True, False]
    # position priority: e0 keeps t0's 1st choice (earlier), e1 t2's 1st choice over t0's 2nd,
    # e2 t1's 2nd choice (earlier than t2's)
    keep_pos = capacity_keep_mask(r, 1, "position", seq_len=3)
    assert keep_pos.tolist() == [True, False, False, True, True, False]


def _layer(**router_kw):
    cfg = small_config(router=RouterConfig(top_k=2, **router_kw))
    layer = MoELayer(cfg)
    torch.manual_seed(0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def test_dropped_tokens_get_zero_moe_output_and_the_rest_match_reference():
    layer = _layer(capacity_factor=0.25).train()
    x = torch.randn(2, 16, 32)
    y, r = layer(x)
    C = layer.capacity(32)
    assert C == 4 and r.kept_A is not None and (~r.kept_A).sum() > 0
    kept = r.select(r.kept_A)
    assert kept.expert_counts().max() <= C
    no_expert = kept.experts_per_token() == 0
    assert no_expert.sum() > 0
    assert torch.equal(y.reshape(32, 32)[no_expert], torch.zeros(int(no_expert.sum()), 32))
    ref = reference_moe(layer.experts, x.reshape(32, 32), kept.token_idx_A, kept.expert_idx_A, kept.weight_A)
    torch.testing.assert_close(y.reshape(32, 32), ref, rtol=1e-5, atol=1e-6)
    m = layer.last_metrics
    assert m["dropped_frac"] == pytest.approx((~r.kept_A).float().mean().item())
    assert m["no_expert_token_frac"] == pytest.approx(no_expert.float().mean().item())
    assert m["capacity"] == 4


def test_dropped_token_block_output_is_the_residual():
    cfg = small_config(router=RouterConfig(top_k=1, capacity_factor=0.25))
    model = build_model(cfg).train()
    block = model.blocks[0]
    x = torch.randn(1, 12, 32)
    T = torch.arange(12)
    from moelab.layers.rope import rope_cos_sin
    cos, sin = rope_cos_sin(T, cfg.head_dim, cfg.attention.rope_theta)
    out, r = block(x, cos, sin, T)
    residual = x + block.attn(block.attn_norm(x), cos, sin, T)
    dropped_tokens = (r.select(r.kept_A).experts_per_token() == 0).nonzero().flatten()
    assert dropped_tokens.numel() >= 12 - 4  # capacity 1 per expert, 4 experts
    torch.testing.assert_close(out[0, dropped_tokens], residual[0, dropped_tokens], rtol=0, atol=0)


def test_dropped_fraction_by_position_shows_late_tokens_dropped():
    layer = _layer(capacity_factor=0.5, drop_priority="position_global").train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
        layer.router.weight[1] = 0.5  # every token picks experts 0 and 1
    x = torch.rand(2, 8, 32) + 0.1  # positive inputs: logits for e0 > e1 > 0 = others
    layer(x)
    # C = ceil(0.5 * 16 * 2 / 4) = 4 per expert: positions 0, 1 of both sequences kept
    by_pos = layer.last_metrics["dropped_frac_by_position"]
    assert by_pos.tolist() == [0.0, 0.0] + [1.0] * 6
    assert layer.last_metrics["dropped_frac"] == pytest.approx(0.75)
    # the default, the flattened order: positions 0-3 of the first sequence kept, the second dropped
    layer.router_cfg.drop_priority = "position"
    layer(x)
    assert layer.last_metrics["dropped_frac_by_position"].tolist() == [0.5] * 4 + [1.0] * 4


@pytest.mark.parametrize("kind", ["topk", "top_p", "deepseek_v3"])
def test_dropless_equals_capacity_with_large_factor(kind):
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12))
    outs = []
    for cf in (None, 8.0):
        cfg = small_config(router=RouterConfig(type=kind, top_k=2, capacity_factor=cf, z_loss_coef=1e-3))
        torch.manual_seed(1)
        model = build_model(cfg).train()
        out = model(ids, labels=ids)
        out.loss.backward()
        outs.append((out, [p.grad.clone() for p in model.parameters()], model.moe_layers()[0].last_metrics))
    (a, ga, ma), (b, gb, mb) = outs
    assert mb["dropped_frac"] == 0.0 and mb["capacity"] is not None and ma["capacity"] is None
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_train_and_eval_capacity_factors_are_separate():
    layer = _layer(capacity_factor=1.25, eval_capacity_factor=2.0)
    assert layer.train().capacity(64) == 40  # ceil(1.25 * 64 * 2 / 4)
    assert layer.eval().capacity(64) == 64
    assert _layer(capacity_factor=1.0).eval().capacity(64) is None  # eval null = dropless


def test_expert_choice_through_capacity_drops_nothing():
    cfg = small_config(router=RouterConfig(type="expert_choice", top_k=2, capacity_factor=1.0))
    layer = MoELayer(cfg).train()
    layer(torch.randn(2, 10, 32))
    assert layer.last_metrics["dropped_frac"] == 0.0
    assert layer.last_counts_E.tolist() == [10] * 4
    assert layer.last_metrics["max_vio"] == 0.0


def test_dispatch_without_capacity_unchanged_api():
    layer = _layer()
    x = torch.randn(5, 32)
    r = layer.router(x)
    torch.testing.assert_close(dispatch_combine(layer.experts, x, r),
                               reference_moe(layer.experts, x, r.token_idx_A, r.expert_idx_A, r.weight_A),
                               rtol=1e-5, atol=1e-6)


def test_position_priority_puts_every_first_choice_before_any_second_choice():
    # C = 1: token 0 routes [e1, e0], token 1 routes [e0, e2]. Token 1's 1st choice (e0) outranks
    # token 0's 2nd choice (e0), although token 0 comes first (GShard Alg. 1, flaxformer).
    r = _routing([0, 0, 1, 1], [1, 0, 0, 2], [0.6, 0.4, 0.7, 0.3], T=2, E=3)
    keep = capacity_keep_mask(r, 1, "position", seq_len=2)
    assert keep.tolist() == [True, False, True, True]


def test_choice_rank_is_routing_order_not_gate_order():
    # DeepSeek-V3 ranks by s + b; a 1st choice may carry the smaller gate. Token 0: 1st choice e0
    # (gate 0.2), 2nd e1 (gate 0.8); token 1: 1st choice e1. C = 1 on e1: token 1's 1st choice wins.
    r = _routing([0, 0, 1, 1], [0, 1, 1, 2], [0.2, 0.8, 0.9, 0.1], T=2, E=3)
    for priority in ("position", "position_global", "score"):
        keep = capacity_keep_mask(r, 1, priority, seq_len=2)
        assert keep.tolist() == [True, False, True, True], priority


def _skewed_random_routing(seed: int) -> Routing:
    """B=4, S=64, E=8, K=2 softmax top-2 of random logits with a mild preference for higher experts."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4 * 64, 8, generator=g) + torch.linspace(0, 1.0, 8)
    w, idx = logits.softmax(-1).topk(2, dim=-1)
    return Routing.from_topk(idx, w, logits, logits.softmax(-1))


@pytest.mark.parametrize("priority", ["position", "position_global", "score"])
def test_first_choices_drop_only_when_first_choices_alone_overflow(priority):
    # Capacity factor 1.0: C = 64. Under choice-rank priority expert e drops exactly
    # max(0, first choices to e - C) first choices. Ordering by position alone (the old rule)
    # dropped ~53 first choices here and left ~22 of 256 tokens with no expert.
    for seed in range(6):
        r = _skewed_random_routing(seed)
        C = expert_capacity(1.0, r.num_tokens, 2, 8)
        keep = capacity_keep_mask(r, C, priority, seq_len=64)
        first_E = torch.bincount(r.expert_idx_A.view(-1, 2)[:, 0], minlength=8)
        first_dropped = int((~keep.view(-1, 2)[:, 0]).sum())
        assert first_dropped == int((first_E - C).clamp_min(0).sum()), seed
        assert (r.select(keep).experts_per_token() == 0).sum() <= first_dropped
        assert r.select(keep).expert_counts().max() <= C


@pytest.mark.parametrize("cf", [0.25, 1.0, 4.0])
def test_batched_capacity_path_equals_sorted_kernel_forward_and_backward(cf):
    """capacity_impl="batched" (padded (E, C, D) batched matmuls) against the sorted kernel on the
    same kept routing: outputs, input gradients and expert weight gradients."""
    results = []
    for impl in ("sorted", "batched"):
        torch.manual_seed(0)
        layer = _layer(capacity_factor=cf).train()
        layer.experts.capacity_impl = impl
        x = torch.randn(2, 16, 32, requires_grad=True)
        y, _ = layer(x)
        (y * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((y.detach(), x.grad, layer.experts.gate_EFD.grad, layer.experts.down_EDF.grad,
                        layer.router.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
