"""Switch, noisy top-k, dynamic top-p and expert choice against hand-computed examples."""

import math

import pytest
import torch

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.moe.layer import MoELayer
from moelab.moe.routers import build_router
from moelab.params import count_params

# Router weight = identity, so the logits are the inputs themselves.
LOGITS = [[1.0, 2.0, 0.0, -1.0], [0.5, 0.25, 3.0, 0.0], [0.0, 0.1, 0.2, 0.3]]


def _identity_router(**kw):
    router = build_router(RouterConfig(**kw), 4, 4)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    return router


def _softmax(xs):
    z = sum(math.exp(v) for v in xs)
    return [math.exp(v) / z for v in xs]


def _pairs(r):
    return sorted((int(t), int(e), float(w)) for t, e, w in zip(r.token_idx_A, r.expert_idx_A, r.weight_A.detach()))


def test_switch_top1_by_hand():
    r = _identity_router(type="switch", top_k=1)(torch.tensor(LOGITS))
    expected = [(0, 1, _softmax(LOGITS[0])[1]), (1, 2, _softmax(LOGITS[1])[2]), (2, 3, _softmax(LOGITS[2])[3])]
    got = _pairs(r)
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in expected]
    for (_, _, w), (_, _, we) in zip(got, expected):
        assert w == pytest.approx(we, abs=1e-7)  # gate is p_i*, not 1


def test_noisy_topk_eval_is_clean_topk_then_softmax():
    router = _identity_router(type="noisy_topk", top_k=2).eval()
    r = router(torch.tensor(LOGITS))
    assert r.expert_idx_A.view(3, 2).tolist() == [[1, 0], [2, 0], [3, 2]]
    w = r.weight_A.view(3, 2)
    assert w[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=1e-7)
    assert w[2, 0].item() == pytest.approx(1 / (1 + math.exp(-0.1)), abs=1e-7)


def test_noisy_topk_training_noise_is_std_normal_times_softplus():
    router = _identity_router(type="noisy_topk", top_k=2).train()
    assert torch.count_nonzero(router.noise_weight) == 0  # W_noise starts at zero
    x = torch.tensor(LOGITS)
    torch.manual_seed(123)
    eps = torch.randn(3, 4)
    torch.manual_seed(123)
    r = router(x)
    H = x + eps * (math.log(2.0) + 1e-2)  # softplus(0) = ln 2, plus noise_epsilon
    top, idx = H.topk(2, dim=-1)
    assert r.expert_idx_A.view(3, 2).tolist() == idx.tolist()
    torch.testing.assert_close(r.weight_A.view(3, 2), top.softmax(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(r.logits_TE, x)  # the clean logits are reported


def test_noisy_topk_w_noise_zero_after_model_init_and_trainable():
    from tests.helpers import small_config
    from moelab.model import build_model
    model = build_model(small_config(router=RouterConfig(type="noisy_topk", top_k=2, noisy_load_loss_coef=0.1)))
    router = model.moe_layers()[0].router
    assert torch.count_nonzero(router.noise_weight) == 0
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert router.noise_weight.grad.abs().sum() > 0  # the smooth load loss trains W_noise


def test_top_p_by_hand():
    # p = softmax([1, 2, 0, -1]) = [0.2369, 0.6439, 0.0871, 0.0321] (sorted: e1, e0, e2, e3)
    p0 = _softmax(LOGITS[0])
    r = _identity_router(type="top_p", top_p=0.5)(torch.tensor(LOGITS[:1]))
    assert _pairs(r) == [(0, 1, pytest.approx(p0[1], abs=1e-7))]  # 0.64 >= 0.5: one expert
    r = _identity_router(type="top_p", top_p=0.8)(torch.tensor(LOGITS[:1]))
    got = _pairs(r)
    assert [(t, e) for t, e, _ in got] == [(0, 0), (0, 1)]  # 0.64 < 0.8 <= 0.88
    assert [w for _, _, w in got] == [pytest.approx(p0[0], abs=1e-7), pytest.approx(p0[1], abs=1e-7)]  # raw probs
    assert sum(w for _, _, w in got) < 1  # not renormalised
    r = _identity_router(type="top_p", top_p=1.0)(torch.tensor(LOGITS[:1]))
    assert r.expert_idx_A.numel() == 4


def test_top_p_selects_minimal_prefix_reaching_p():
    torch.manual_seed(1)
    E, p = 16, 0.6
    router = build_router(RouterConfig(type="top_p", top_p=p), 16, E)
    torch.nn.init.normal_(router.weight, std=0.5)
    r = router(torch.randn(300, 16))
    probs = r.probs_TE.double()
    n_T = r.experts_per_token()
    for t in range(300):
        sorted_p, order = probs[t].sort(descending=True)
        cum = sorted_p.cumsum(0)
        m = int((cum < p).sum()) + 1  # smallest m with top-m mass >= p
        if (cum - p).abs().min() < 1e-6:
            continue  # float boundary
        mine = set(r.expert_idx_A[r.token_idx_A == t].tolist())
        assert n_T[t] == m and mine == set(order[:m].tolist())
    assert n_T.min() >= 1 and n_T.float().std() > 0  # dynamic: counts vary


def _ec_layer(top_k=1, cf=None, E=4, **kw):
    cfg = ModelConfig(vocab_size=16, d_model=4, num_layers=1, attention=AttentionConfig(num_heads=2), moe=MoEConfig(
        num_experts=E, expert_ffn_dim=4,
        router=RouterConfig(type="expert_choice", top_k=top_k, capacity_factor=cf, **kw)))
    return cfg


def test_expert_choice_by_hand():
    router = _identity_router(type="expert_choice", top_k=1, capacity_factor=1.0).train()
    x = torch.tensor(LOGITS + [[0.0, 0.0, 0.0, 5.0]])  # T = 4 tokens, E = 4 experts
    r = router(x)
    C = math.ceil(1.0 * 4 * 1 / 4)
    assert C == 1 and router.capacity(4) == 1
    probs = [_softmax(row) for row in x.tolist()]
    # each expert takes the token with the highest probability for it
    best = [max(range(4), key=lambda t: probs[t][e]) for e in range(4)]
    expected = sorted((best[e], e, probs[best[e]][e]) for e in range(4))
    got = _pairs(r)
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in expected]
    for (_, _, w), (_, _, we) in zip(got, expected):
        assert w == pytest.approx(we, abs=1e-7)
    n_T = r.experts_per_token().tolist()
    assert 0 in n_T and max(n_T) >= 2  # tokens get 0..E experts


@pytest.mark.parametrize("top_k, cf, T", [(1, 1.0, 37), (2, 1.0, 64), (1, 2.0, 50), (2, 1.25, 33)])
def test_expert_choice_gives_every_expert_exactly_its_capacity(top_k, cf, T):
    E = 8
    router = build_router(RouterConfig(type="expert_choice", top_k=top_k, capacity_factor=cf), 16, E).train()
    torch.nn.init.normal_(router.weight)
    r = router(torch.randn(T, 16))
    C = math.ceil(cf * T * top_k / E)
    assert r.expert_counts().tolist() == [C] * E
    assert r.experts_per_token().float().mean().item() == pytest.approx(C * E / T)
    # no token twice for one expert
    assert len(set(zip(r.token_idx_A.tolist(), r.expert_idx_A.tolist()))) == C * E


def test_expert_choice_eval_rule_is_causal_topk():
    router = _identity_router(type="expert_choice", top_k=2, capacity_factor=1.0)
    x = torch.tensor(LOGITS)
    router.eval()
    r = router(x)
    assert r.expert_idx_A.view(3, 2).tolist() == [[1, 0], [2, 0], [3, 2]]
    torch.testing.assert_close(r.weight_A.view(3, 2), x.softmax(-1).topk(2, dim=-1).values)
    # causal: a token's routing does not depend on later tokens
    r_prefix = router(x[:2])
    assert torch.equal(r_prefix.expert_idx_A, r.expert_idx_A[:4])
    # "batch" keeps expert choice in eval (non-causal), with the training capacity
    router_b = _identity_router(type="expert_choice", top_k=2, capacity_factor=1.0, expert_choice_eval="batch").eval()
    assert router_b(x).expert_counts().tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("top_k, cf, active", [(2, None, 2), (1, 2.0, 2), (1, 1.5, 2), (2, 1.25, 3), (1, 0.25, 1)])
def test_expert_choice_active_param_count_is_int(top_k, cf, active):
    cfg = _ec_layer(top_k=top_k, cf=cf, E=8)
    layer = MoELayer(cfg)
    assert layer.router.active_experts_per_token == active
    count = count_params(cfg)
    per_expert = 3 * 4 * 4
    assert isinstance(count.active_params, int)
    assert count.total_params - count.active_params == (8 - active) * per_expert


def test_jitter_and_temperature_apply_to_every_router():
    x = torch.tensor(LOGITS)
    for kind in ("switch", "noisy_topk", "expert_choice", "top_p", "deepseek_v2", "deepseek_v3"):
        kw = {"top_k": 1} if kind == "switch" else {}
        r = _identity_router(type=kind, temperature=2.0, **kw).eval()(x)
        torch.testing.assert_close(r.logits_TE, x / 2)
        router = _identity_router(type=kind, jitter_eps=0.5, **kw).train()
        torch.manual_seed(0)
        u = torch.empty(3, 4).uniform_(0.5, 1.5)
        torch.manual_seed(0)
        torch.testing.assert_close(router(x).logits_TE, x * u)
        assert router.eval()(x.to(torch.bfloat16)).logits_TE.dtype == torch.float32


@pytest.mark.parametrize("pre", [-60.0, -120.0])
def test_noisy_topk_load_loss_finite_when_softplus_underflows(pre):
    # x W_noise = -60: softplus 8.8e-27; -120: softplus 0. Without noise_epsilon the smooth load
    # loss divides by that std and its gradient is NaN.
    E, D = 4, 4
    router = build_router(RouterConfig(type="noisy_topk", top_k=2, noisy_load_loss_coef=0.1,
                                       importance_loss_coef=0.1), D, E).train()
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
        router.noise_weight.fill_(pre / D)  # x = ones -> x W_noise = pre for every expert
    x = torch.ones(6, D) + 0.1 * torch.randn(6, D, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    r = router(x)
    loss = r.aux_losses["noisy_load"]
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(router.weight.grad).all()
    assert torch.isfinite(router.noise_weight.grad).all()


def test_top_p_exact_tie_keeps_the_smallest_prefix_reaching_p():
    # uniform P over E = 4, p = 0.5: 0.25 + 0.25 reaches p exactly, so 2 experts (the public
    # Dynamic-MoE code keeps cum <= p plus the next one: 3)
    r = _identity_router(type="top_p", top_p=0.5)(torch.zeros(1, 4))
    assert r.experts_per_token().tolist() == [2]


def test_expert_choice_batch_eval_refuses_a_kv_cache():
    from moelab.errors import ConfigError
    from moelab.inference.generate import generate_ids
    from moelab.model import build_model
    from tests.helpers import small_config

    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    batch = build_model(small_config(router=RouterConfig(type="expert_choice", top_k=2,
                                                         expert_choice_eval="batch"))).eval()
    with pytest.raises(ConfigError, match="expert_choice_eval.*topk"):
        generate_ids(batch, ids, 3, temperature=0.0, top_k=None, top_p=None, use_cache=True)
    with pytest.raises(ConfigError, match="expert_choice_eval"):
        batch.train()(ids, cache=batch.new_cache())
    # without a cache it still runs; the causal fallback decodes with a cache and equals no cache
    batch.eval()
    generate_ids(batch, ids, 3, temperature=0.0, top_k=None, top_p=None, use_cache=False)
    causal = build_model(small_config(router=RouterConfig(type="expert_choice", top_k=2))).eval()
    a = generate_ids(causal, ids, 5, temperature=0.0, top_k=None, top_p=None, use_cache=True)
    b = generate_ids(causal, ids, 5, temperature=0.0, top_k=None, top_p=None, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("router", [
    dict(type="topk", top_k=3), dict(type="topk", top_k=3, softmax_order="softmax_then_topk"),
    dict(type="noisy_topk", top_k=3), dict(type="top_p", top_p=0.7, top_k=2),
    dict(type="expert_choice", top_k=2, capacity_factor=1.0), dict(type="deepseek_v2", top_k=3),
    dict(type="sparsemixer", top_k=2)])
def test_every_router_emits_a_tokens_choices_best_first(router):
    # the Routing invariant capacity priority relies on: token-major, each token's choices in
    # descending order of the router's own ranking (gates here, for routers that rank by gate)
    from moelab.moe.dispatch import choice_rank

    torch.manual_seed(0)
    r_mod = build_router(RouterConfig(**router), 8, 6).train(router["type"] == "expert_choice")  # EC: batch rule
    torch.nn.init.normal_(r_mod.weight)
    r = r_mod(torch.randn(12, 8))
    rank = choice_rank(r)
    for t in range(12):
        mine = (r.token_idx_A == t).nonzero().squeeze(1)
        assert rank[mine].tolist() == list(range(len(mine)))
        if router["type"] == "sparsemixer":  # pick order: each pick's gate is over its own survivors
            assert r.expert_idx_A[mine[0]] == r.logits_TE[t].argmax()
            continue
        w = r.weight_A[mine]
        assert torch.all(w[:-1] >= w[1:]), (router, w)


def test_group_score_needs_a_deepseek_router():
    from moelab.errors import ConfigError

    with pytest.raises(ConfigError, match="router.group_score"):
        RouterConfig(type="topk", group_score="max")
