import math

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig, RouterConfig
from moelab.layers.mlp import GatedMLP
from moelab.model import build_model
from moelab.moe.balancing import router_z_loss, switch_load_balance_loss
from moelab.moe.dispatch import dispatch_combine
from moelab.moe.experts import StackedExperts, reference_moe
from moelab.moe.layer import MoELayer
from moelab.moe.routers import build_router
from moelab.moe.routing import Routing


def _grads(*tensors):
    return [t.grad.clone() for t in tensors]


def test_one_expert_top1_equals_dense_mlp():
    cfg = ModelConfig(vocab_size=16, d_model=24, num_layers=1, dense_ffn_dim=40,
                      moe=MoEConfig(num_experts=1, expert_ffn_dim=40, router=RouterConfig(top_k=1)))
    layer = MoELayer(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    dense = GatedMLP(24, 40)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(layer.experts.gate_EFD[0])
        dense.up_proj.weight.copy_(layer.experts.up_EFD[0])
        dense.down_proj.weight.copy_(layer.experts.down_EDF[0])
    x = torch.randn(3, 7, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_moe, _ = layer(x1)
    y_dense = dense(x2)
    torch.testing.assert_close(y_moe, y_dense, rtol=0, atol=1e-6)
    g = torch.randn_like(y_moe)
    (y_moe * g).sum().backward()
    (y_dense * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.experts.gate_EFD.grad[0], dense.gate_proj.weight.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.experts.up_EFD.grad[0], dense.up_proj.weight.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.experts.down_EDF.grad[0], dense.down_proj.weight.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("T, D, F, E, K", [
    (1, 8, 12, 4, 1), (17, 16, 24, 8, 2), (33, 8, 8, 6, 6), (5, 12, 16, 16, 3), (64, 8, 4, 3, 2),
])
def test_dropless_dispatch_equals_reference_loop(T, D, F, E, K):
    g = torch.Generator().manual_seed(T * 100 + E)
    experts = StackedExperts(E, D, F)
    for p in experts.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g)
    if E > K + 1:  # make one expert receive no token at all
        logits[:, E - 1] = -100.0
    w_TK, idx_TK = logits.softmax(-1).topk(K, dim=-1)
    w_TK = w_TK.clone().requires_grad_()
    routing = Routing.from_topk(idx_TK, w_TK, logits, logits.softmax(-1))
    if E > K + 1:
        assert routing.expert_counts()[E - 1] == 0
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast = dispatch_combine(experts, x1, routing)
    gy = torch.randn_like(fast)
    (fast * gy).sum().backward()
    g_fast = [x1.grad.clone(), w_TK.grad.clone()] + [p.grad.clone() for p in experts.parameters()]
    experts.zero_grad()
    w_TK.grad = None
    ref = reference_moe(experts, x2, routing.token_idx_A, routing.expert_idx_A, routing.weight_A)
    (ref * gy).sum().backward()
    g_ref = [x2.grad.clone(), w_TK.grad.clone()] + [p.grad.clone() for p in experts.parameters()]
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_moe_layer_with_k_equal_e_uses_every_expert():
    cfg = ModelConfig(vocab_size=16, d_model=16, num_layers=1,
                      moe=MoEConfig(num_experts=4, expert_ffn_dim=8, router=RouterConfig(top_k=4)))
    layer = MoELayer(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 16)
    y, routing = layer(x)
    assert routing.expert_counts().tolist() == [6, 6, 6, 6]
    ref = reference_moe(layer.experts, x.reshape(6, 16), routing.token_idx_A, routing.expert_idx_A, routing.weight_A)
    torch.testing.assert_close(y.reshape(6, 16), ref, rtol=1e-5, atol=1e-6)
    # K = E with Mixtral gating is a softmax over all experts: the weights are the full softmax
    torch.testing.assert_close(routing.weight_A.view(6, 4).sum(-1), torch.ones(6))


# A fixed example: router weight = identity, so the logits are the inputs themselves.
LOGITS = [[1.0, 2.0, 0.0, -1.0], [0.5, 0.25, 3.0, 0.0]]


def _route(**kw):
    router = build_router(RouterConfig(top_k=2, **kw), 4, 4)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    r = router(torch.tensor(LOGITS))
    return r.expert_idx_A.view(2, 2).tolist(), r.weight_A.view(2, 2)


def _softmax(xs):
    z = sum(math.exp(v) for v in xs)
    return [math.exp(v) / z for v in xs]


def test_mixtral_form_by_hand():
    idx, w = _route(softmax_order="topk_then_softmax")
    assert idx == [[1, 0], [2, 0]]
    expected = [[1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))], [1 / (1 + math.exp(-2.5)), 1 / (1 + math.exp(2.5))]]
    torch.testing.assert_close(w, torch.tensor(expected), rtol=0, atol=1e-7)


def test_softmax_then_topk_by_hand():
    idx, w = _route(softmax_order="softmax_then_topk", norm_topk_prob=False)
    assert idx == [[1, 0], [2, 0]]
    p0, p1 = _softmax(LOGITS[0]), _softmax(LOGITS[1])
    torch.testing.assert_close(w, torch.tensor([[p0[1], p0[0]], [p1[2], p1[0]]]), rtol=0, atol=1e-7)
    assert w.sum(-1).max() < 1  # not renormalised: the gates sum to less than 1
    idx_n, w_n = _route(softmax_order="softmax_then_topk", norm_topk_prob=True)
    torch.testing.assert_close(w_n, w / w.sum(-1, keepdim=True), rtol=0, atol=1e-7)


def test_mixtral_form_equals_softmax_topk_renormalise():
    torch.manual_seed(3)
    x = torch.randn(50, 16)
    routers = [build_router(RouterConfig(top_k=3, softmax_order=o, norm_topk_prob=True), 16, 8)
               for o in ("topk_then_softmax", "softmax_then_topk")]
    torch.nn.init.normal_(routers[0].weight)
    with torch.no_grad():
        routers[1].weight.copy_(routers[0].weight)
    a, b = routers[0](x), routers[1](x)
    assert torch.equal(a.expert_idx_A, b.expert_idx_A)
    torch.testing.assert_close(a.weight_A, b.weight_A, rtol=1e-6, atol=1e-7)


def test_switch_loss_by_hand_and_at_uniform():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    expert_idx = torch.tensor([0, 1, 0, 2])  # top-1
    f = [2 / 4, 1 / 4, 1 / 4]
    P = [(0.7 + 0.1 + 0.5 + 0.2) / 4, (0.2 + 0.6 + 0.25 + 0.2) / 4, (0.1 + 0.3 + 0.25 + 0.6) / 4]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, P))
    assert switch_load_balance_loss(probs, expert_idx).item() == pytest.approx(expected, rel=1e-6)
    # perfectly uniform: f = P = 1/E gives loss 1, i.e. alpha * loss = alpha (its minimum)
    E, T, K = 4, 8, 2
    uniform_probs = torch.full((T, E), 1 / E)
    idx = torch.arange(T * K) % E
    alpha = 0.01
    assert alpha * switch_load_balance_loss(uniform_probs, idx).item() == pytest.approx(alpha, rel=1e-6)
    # and any imbalance of assignments with peaked probabilities is above the minimum
    assert switch_load_balance_loss(probs, torch.tensor([0, 0, 0, 0])).item() > 1


def test_switch_loss_gradient_flows_through_probs_only():
    logits = torch.randn(6, 4, requires_grad=True)
    probs = logits.softmax(-1)
    loss = switch_load_balance_loss(probs, probs.argmax(-1))
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3.0)]
    assert router_z_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)


def test_router_runs_in_fp32_for_bf16_inputs():
    router = build_router(RouterConfig(top_k=2), 16, 4).to(torch.bfloat16)
    r = router(torch.randn(5, 16, dtype=torch.bfloat16))
    assert r.logits_TE.dtype == torch.float32 and r.weight_A.dtype == torch.float32


def test_aux_losses_reach_model_loss():
    from tests.helpers import small_config
    cfg = small_config(router=RouterConfig(top_k=2, load_balance_coef=0.01, z_loss_coef=0.001))
    model = build_model(cfg)
    routings = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda mod, inp, out: routings.append(out))
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"load_balance", "z_loss"}
    total = out.lm_loss + out.aux_losses["load_balance"] + out.aux_losses["z_loss"]
    torch.testing.assert_close(out.loss, total)
    assert len(routings) == 2  # summed over the two MoE layers, each from its own routing
    lb = sum(0.01 * switch_load_balance_loss(r.probs_TE, r.expert_idx_A) for r in routings)
    z = sum(0.001 * router_z_loss(r.logits_TE) for r in routings)
    torch.testing.assert_close(out.aux_losses["load_balance"], lb)
    torch.testing.assert_close(out.aux_losses["z_loss"], z)
