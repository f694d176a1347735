"""DeepSeek-V2 / V3 routing by hand, group-limited routing, and the aux-loss-free bias."""

import math

import pytest
import torch

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.model import build_model
from moelab.moe import update_router_biases
from moelab.moe.layer import MoELayer
from moelab.moe.routers import build_router


def _identity_router(E=4, **kw):
    router = build_router(RouterConfig(**kw), E, E)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router


def _sig(v):
    return 1 / (1 + math.exp(-v))


def test_deepseek_v2_group_limited_by_hand():
    # groups {0,1} and {2,3}; group score = max softmax prob. Token 0: max in g0 = e1 (2.0) beats
    # g1's e2 (1.9), so only e0, e1 are eligible although e2 > e0.
    x = torch.tensor([[1.0, 2.0, 1.9, -1.0]])
    r = _identity_router(type="deepseek_v2", top_k=2, n_group=2, topk_group=1, routed_scaling_factor=16.0)(x)
    p = x.softmax(-1)[0]
    assert sorted(r.expert_idx_A.tolist()) == [0, 1]
    w = dict(zip(r.expert_idx_A.tolist(), r.weight_A.tolist()))
    assert w[1] == pytest.approx(16.0 * p[1].item(), rel=1e-6)  # raw s x scale, not renormalised
    assert w[0] == pytest.approx(16.0 * p[0].item(), rel=1e-6)
    # without the group limit, e2 wins
    r_free = _identity_router(type="deepseek_v2", top_k=2)(x)
    assert sorted(r_free.expert_idx_A.tolist()) == [1, 2]


def test_deepseek_v3_by_hand_bias_only_selects():
    x = torch.tensor([[1.0, 0.5, 0.0, -0.5]])
    router = _identity_router(type="deepseek_v3", top_k=2, routed_scaling_factor=2.5)
    s = [_sig(v) for v in x[0].tolist()]
    r = router(x)
    assert sorted(r.expert_idx_A.tolist()) == [0, 1]
    w = dict(zip(r.expert_idx_A.tolist(), r.weight_A.tolist()))
    assert w[0] == pytest.approx(2.5 * s[0] / (s[0] + s[1]), rel=1e-6)
    assert w[1] == pytest.approx(2.5 * s[1] / (s[0] + s[1]), rel=1e-6)
    torch.testing.assert_close(r.probs_TE, torch.tensor([s]) / sum(s))  # eq. 19 for the losses
    # a bias moves the selection to e2, e3, but gates still use the unbiased s
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([-1.0, -1.0, 0.0, 0.0]))
    r = router(x)
    assert sorted(r.expert_idx_A.tolist()) == [2, 3]
    w = dict(zip(r.expert_idx_A.tolist(), r.weight_A.tolist()))
    assert w[2] == pytest.approx(2.5 * s[2] / (s[2] + s[3]), rel=1e-6)


def test_deepseek_v3_group_score_is_top2_sum_with_neg_inf_mask():
    # groups {0,1}, {2,3}: max favours g0 (0.9 vs 0.8) but top-2 sum favours g1 (0.8+0.8 > 0.9+0.1).
    s = torch.tensor([[0.9, 0.1, 0.8, 0.8]])
    x = torch.log(s / (1 - s))  # logits whose sigmoid is s
    r = _identity_router(type="deepseek_v3", top_k=2, n_group=2, topk_group=1)(x)
    assert sorted(r.expert_idx_A.tolist()) == [2, 3]
    # all-negative s + b in the kept group must still win over masked experts (no 0.0 mask)
    router = _identity_router(type="deepseek_v3", top_k=2, n_group=2, topk_group=1)
    with torch.no_grad():
        router.e_score_correction_bias.fill_(-5.0)
    assert sorted(router(x).expert_idx_A.tolist()) == [2, 3]


@pytest.mark.parametrize("kind", ["deepseek_v2", "deepseek_v3"])
def test_group_limited_never_selects_outside_chosen_groups(kind):
    torch.manual_seed(2)
    E, G, M, K = 16, 4, 2, 3
    router = build_router(RouterConfig(type=kind, top_k=K, n_group=G, topk_group=M), 8, E)
    torch.nn.init.normal_(router.weight)
    if kind == "deepseek_v3":
        with torch.no_grad():
            router.e_score_correction_bias.copy_(torch.randn(E) * 0.1)
    r = router(torch.randn(200, 8))
    if kind == "deepseek_v2":
        score_TG = r.probs_TE.view(200, G, E // G).amax(-1)
    else:
        sb = r.scores_TE + router.e_score_correction_bias
        score_TG = sb.view(200, G, E // G).topk(2, dim=-1).values.sum(-1)
    chosen_TM = score_TG.topk(M, dim=-1).indices
    group_A = r.expert_idx_A // (E // G)
    ok = (chosen_TM[r.token_idx_A] == group_A[:, None]).any(-1)
    assert bool(ok.all())
    assert len(torch.unique(group_A)) == G  # every group is used by some token


def _skewed_v3_layer(rate):
    E, D = 8, 8
    cfg = ModelConfig(vocab_size=16, d_model=D, num_layers=1, attention=AttentionConfig(num_heads=2),
                      moe=MoEConfig(num_experts=E, expert_ffn_dim=4, router=RouterConfig(
                          type="deepseek_v3", top_k=2, bias_update_rate=rate, load_balance_coef=0.0)))
    layer = MoELayer(cfg).train()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))
    torch.manual_seed(0)
    x = torch.randn(4, 64, D) * 0.5 + torch.linspace(0.5, -0.5, E)  # expert 0 favoured, expert 7 starved
    return layer, x


def test_aux_free_bias_balances_skewed_router_without_touching_gates():
    layer, x = _skewed_v3_layer(rate=1e-3)  # DeepSeek-V3's gamma
    with torch.no_grad():
        layer(x)
    maxvio_before = layer.last_metrics["max_vio"]
    history = []
    for _ in range(300):
        layer.update_router_bias()
        with torch.no_grad():
            _, r = layer(x)
        history.append(layer.last_metrics["max_vio"])
    assert maxvio_before > 1.0  # 1.17 measured
    assert max(history[-50:]) < 0.15  # ~0.03 measured after 300 updates
    bias = layer.router.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias[0] < 0 < bias[-1]  # overloaded down, starved up
    # combine weights are still s / sum_selected s: the bias never enters them
    s = torch.sigmoid(x.reshape(-1, 8))
    sel = r.expert_idx_A.view(-1, 2)
    expected = s.gather(-1, sel) / s.gather(-1, sel).sum(-1, keepdim=True)
    torch.testing.assert_close(r.weight_A.view(-1, 2), expected, rtol=1e-6, atol=1e-7)


def test_bias_update_rule_and_counter_reset():
    layer, x = _skewed_v3_layer(rate=0.01)
    with torch.no_grad():
        layer(x)
        layer(x)  # two micro-batches accumulate
    load = layer.load_accum_E.clone()
    assert torch.equal(load, 2 * layer.last_counts_E)
    update_router_biases(torch.nn.Sequential(layer))
    expected = 0.01 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(layer.router.e_score_correction_bias, expected)
    assert layer.load_accum_E.sum() == 0
    layer.eval()
    with torch.no_grad():
        layer(x)  # eval forwards do not count
    assert layer.load_accum_E.sum() == 0


def test_bias_is_a_persistent_fp32_buffer():
    from tests.helpers import small_config
    model = build_model(small_config(router=RouterConfig(type="deepseek_v3", top_k=2, bias_update_rate=1e-3)))
    keys = [k for k in model.state_dict() if k.endswith("e_score_correction_bias")]
    assert len(keys) == 2
    assert not any("load_accum" in k for k in model.state_dict())
    router = model.moe_layers()[0].router
    with torch.no_grad():
        router.e_score_correction_bias.fill_(1e-3 / 3)
    model = model.to(torch.bfloat16)
    bias = model.moe_layers()[0].router.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias[0].item() == pytest.approx(1e-3 / 3, rel=1e-7)
    assert not any(p is bias for p in model.parameters())
    model2 = build_model(small_config(router=RouterConfig(type="deepseek_v3", top_k=2)))
    model2.load_state_dict(model.float().state_dict())
    assert model2.moe_layers()[0].router.e_score_correction_bias[0].item() == pytest.approx(1e-3 / 3, rel=1e-7)


# scores [.90, 0, .60, .55, .80, .10, .50, .45]: 4 groups of 2, keep 2, K = 2 (REFERENCES §4.3)
GROUP_EXAMPLE = [0.90, 0.0, 0.60, 0.55, 0.80, 0.10, 0.50, 0.45]


@pytest.mark.parametrize("group_score,groups", [
    (None, {1, 3}),  # the released V3 code / transformers: sum of the top 2 -> g1 1.15, g3 0.95
    ("sum_top2", {1, 3}),
    ("sum_top_k_over_m", {0, 2}),  # the paper: K/M = 2/2 = 1, the group max -> g0 .90, g2 .80
    ("max", {0, 2}),
])
def test_deepseek_v3_group_score_rule(group_score, groups):
    s = torch.tensor([GROUP_EXAMPLE]).clamp(1e-6, 1 - 1e-6)
    x = torch.log(s / (1 - s))
    r = _identity_router(E=8, type="deepseek_v3", top_k=2, n_group=4, topk_group=2, group_score=group_score)(x)
    assert {e // 2 for e in r.expert_idx_A.tolist()} <= groups
    # the best expert (0) is dropped only by the top-2 sum
    assert (0 in r.expert_idx_A.tolist()) == (0 in groups)


def test_group_score_top_k_over_m_sums_k_over_m_entries():
    from moelab.moe.routers.deepseek import group_limited, group_score_width

    assert group_score_width("sum_top_k_over_m", 8, 4) == 2  # V3's own 8/4: equals the released top-2
    assert group_score_width("sum_top_k_over_m", 6, 4) == 1  # floor, as Megatron's topk // group_topk
    assert group_score_width("sum_top_k_over_m", 12, 2) == 6
    # width 3 over groups of 4: g0 = .5+.4+.3 = 1.2 beats g1 = .9+.1+.1 = 1.1 (the max would pick g1)
    sel = torch.tensor([[0.5, 0.4, 0.3, 0.0, 0.9, 0.1, 0.1, 0.0]])
    out = group_limited(sel, 2, 1, 3)
    assert torch.isinf(out[0, 4:]).all() and torch.isfinite(out[0, :4]).all()
    assert torch.isinf(group_limited(sel, 2, 1, 1)[0, :4]).all()


def test_deepseek_v2_default_group_score_is_max_and_configurable():
    assert RouterConfig(type="deepseek_v2").effective_group_score == "max"
    assert RouterConfig(type="deepseek_v3").effective_group_score == "sum_top2"
    with pytest.raises(ValueError, match="router.group_score"):
        RouterConfig(type="deepseek_v3", group_score="mean")



@pytest.mark.parametrize("bias,groups,s,paper,selected", [
    # s + b = (.7, .8, .3, .2) selects e1; the paper counts Topk(s, 1) = e0
    ([-0.2, 0.0, 0.0, 0.0], {}, [0.9, 0.8, 0.3, 0.2], 0, 1),
    # groups {0,1} (top-2 sum 1.0) and {2,3} (1.5): the group limit selects e2; Topk(s, 1) is e0
    (None, dict(n_group=2, topk_group=1), [0.9, 0.1, 0.8, 0.7], 0, 2),
])
def test_v3_sequence_balance_counts_top_k_of_the_raw_affinities(bias, groups, s, paper, selected):
    """DeepSeek-V3 eq. 17-20: f_i = E/(K T) sum_t 1(s_{i,t} in Topk({s_{j,t}}, K)) over the raw affinities s (no
    bias b, no group limit; Megatron's compute_routing_scores_for_aux_loss alike), P_i = (1/T) sum_t s_{i,t} /
    sum_j s_{j,t}, loss sum_i f_i P_i. One token, E = 4, K = 1: f = 4 at the top-1 of s, 0 elsewhere, so the loss
    is 4 s_top / sum(s). First case: 4 * 0.9 / 2.2 = 1.636 (counting the biased selection e1 gives
    4 * 0.8 / 2.2 = 1.455); second: 4 * 0.9 / 2.5 = 1.44 (the group-limited selection e2: 4 * 0.8 / 2.5 = 1.28)."""
    from moelab.moe.balancing import add_aux_losses

    router = _identity_router(type="deepseek_v3", top_k=1, seq_balance_coef=1.0, **groups)
    if bias is not None:
        with torch.no_grad():
            router.e_score_correction_bias.copy_(torch.tensor(bias))
    st = torch.tensor([s])
    r = router(torch.log(st / (1 - st)))  # logits whose sigmoid is s
    assert r.expert_idx_A.tolist() == [selected]  # the selection itself is unchanged
    add_aux_losses(router.cfg, r, seq_len=1)
    assert r.aux_losses["seq_balance"].item() == pytest.approx(4 * s[paper] / sum(s), rel=1e-6)


def test_v2_sequence_balance_counts_top_k_without_the_group_limit():
    """The same loss under V2's device-limited routing: x = (1, -1, .9, .8), groups {0,1} (max 1.0) and {2,3}
    (max .9), keep 1, K = 2: the selection is {e0, e1}, Topk(s, 2) is {e0, e2}; one token, f = E/K = 2 on the
    counted pair, so the loss is 2 (p_0 + p_2) with p = softmax(x), not 2 (p_0 + p_1)."""
    from moelab.moe.balancing import add_aux_losses

    x = torch.tensor([[1.0, -1.0, 0.9, 0.8]])
    router = _identity_router(type="deepseek_v2", top_k=2, n_group=2, topk_group=1, seq_balance_coef=1.0)
    r = router(x)
    assert sorted(r.expert_idx_A.tolist()) == [0, 1]
    add_aux_losses(router.cfg, r, seq_len=1)
    p = x.softmax(-1)[0]
    assert r.aux_losses["seq_balance"].item() == pytest.approx(2 * (p[0] + p[2]).item(), rel=1e-6)
