"""Autonomy-of-Experts: the layer against a slow loop from Alg. 2, the cache, norms, eq. 5, presets,
training / resume / generation, and bad input."""

import dataclasses

import pytest
import torch

from moelab.config import AoEConfig, AttentionConfig, ModelConfig, MoEConfig, RouterConfig, aoe_d_wide
from moelab.errors import ConfigError, MoelabError
from moelab.layers.mlp import GatedMLP
from moelab.model import build_model
from moelab.moe.aoe import AoEExperts, expert_norms, reference_aoe
from moelab.moe.layer import MoELayer
from moelab.params import count_params
from moelab.presets import get_preset


def _cfg(E=4, K=2, d_low=8, d_model=16, router=None, **aoe):
    router = router or RouterConfig(top_k=K, load_balance_coef=0.0)
    return ModelConfig(vocab_size=64, d_model=d_model, num_layers=2, max_seq_len=64, dense_ffn_dim=32,
                       attention=AttentionConfig(num_heads=4),
                       moe=MoEConfig(num_experts=E, expert_ffn_dim=24, aoe=AoEConfig(d_low=d_low, **aoe),
                                     router=router))


def _layer(cfg, seed=0, std=0.3):
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=std)
    return layer


@pytest.mark.parametrize("E,K,d_low,T", [(4, 2, 8, 9), (6, 3, 4, 5), (3, 3, 5, 7), (8, 1, 12, 3)])
def test_layer_equals_algorithm_2_loop_forward_and_grads(E, K, d_low, T):
    layer = _layer(_cfg(E=E, K=K, d_low=d_low)).train()
    x = torch.randn(1, T, 16, requires_grad=True)
    y, routing = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_aoe(layer.experts, x_ref[0], K)
    torch.testing.assert_close(y[0], ref, rtol=1e-5, atol=1e-6)
    if E == 8 and K == 1:  # few tokens, top-1: some experts receive nothing
        assert (routing.expert_counts() == 0).any()
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((y[0] * g).sum(), [x, *layer.experts.parameters()])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x_ref, *layer.experts.parameters()])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert layer.router.weight is None and not list(layer.router.parameters())  # no router


def test_one_expert_top1_is_a_swiglu_mlp_with_factorised_gate():
    layer = _layer(_cfg(E=1, K=1, d_low=6)).eval()
    ex = layer.experts
    mlp = GatedMLP(16, ex.d_wide)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(ex.wup_EWL[0] @ ex.wdown_ELD[0])  # W_g = W_down W_up
        mlp.up_proj.weight.copy_(ex.wp_EWD[0])
        mlp.down_proj.weight.copy_(ex.wo_EDW[0])
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x)[0], mlp(x), rtol=1e-5, atol=1e-6)


def test_cached_activation_equals_recomputation_and_unselected_experts_do_no_wide_work():
    layer = _layer(_cfg(E=4, K=1)).eval()
    x = torch.randn(6, 16)
    c_TEL = layer.experts.low_rank_all(x)
    for e in range(4):
        torch.testing.assert_close(layer.experts.expert(e, x, c_TEL[:, e]), layer.experts.expert(e, x),
                                   rtol=1e-5, atol=1e-6)
    # the kernel path equals the per-expert loop, which lets us watch the calls
    ref = layer(x[None])[0]
    layer.experts.impl = "loop"
    torch.testing.assert_close(layer(x[None])[0], ref, rtol=1e-5, atol=1e-6)
    # the layer never recomputes x W_down: the experts' calls all receive the cached rows
    calls = []
    original = layer.experts.expert

    def spy(e, x_ND, c_NL=None):
        calls.append((e, c_NL is not None, x_ND.shape[0]))
        return original(e, x_ND, c_NL)

    layer.experts.expert = spy
    _, routing = layer(x[None])
    used = {int(e): int(n) for e, n in enumerate(routing.expert_counts()) if n}
    assert all(cached for _, cached, _ in calls)
    assert {e: n for e, _, n in calls} == used  # only chosen experts run, once each, on their rows


def test_norm_options_rank_as_defined():
    # expert 0: (3, 0, 0, 0) -> l1 3, l2 3, linf 3; expert 1: (1, 1, 1, 1) -> 4, 2, 1;
    # expert 2: (2, 2, 0, 0) -> 4, 2.83, 2
    c = torch.tensor([[[3.0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 0, 0]]])
    assert expert_norms(c, "l2").argmax().item() == 0
    assert expert_norms(c, "linf").argsort(descending=True).tolist() == [[0, 2, 1]]
    torch.testing.assert_close(expert_norms(c, "l1"), torch.tensor([[3.0, 4.0, 4.0]]))
    torch.testing.assert_close(expert_norms(c, "l2"), torch.tensor([[3.0, 2.0, 8 ** 0.5]]))
    # the layer follows the configured norm: l1 and linf pick different top-1 experts here
    for norm, best in (("l1", {1, 2}), ("linf", {0})):
        layer = _layer(_cfg(E=3, K=1, d_low=4, d_model=8, norm=norm)).eval()
        with torch.no_grad():  # x = ones(8): C_i = row sums of W_down^i = the vectors above
            layer.experts.wdown_ELD.zero_()
            for e, vec in enumerate(c[0]):
                layer.experts.wdown_ELD[e, :, 0] = vec
        _, r = layer(torch.ones(1, 1, 8))
        assert set(r.expert_idx_A.tolist()) <= best


def test_size_matching_formula_gives_the_paper_d_wide():
    assert [aoe_d_wide(768, 3072, d) for d in (64, 128, 256, 512)] == [4393, 4194, 3840, 3264]
    assert abs(aoe_d_wide(1280, 5120, 400) - 6470) <= 1  # 6469.2; the paper's 4B model states 6470
    # d_wide = 3840 at 768/3072/256 makes an AoE expert exactly as large as the SwiGLU expert
    ex = AoEExperts(1, 768, 256, 3840)
    assert sum(p.numel() for p in ex.parameters()) == 3 * 768 * 3072
    assert _cfg(d_low=8).aoe_d_wide == aoe_d_wide(16, 24, 8)
    assert _cfg(d_low=8, d_wide=40).aoe_d_wide == 40


@pytest.mark.parametrize("name,total,paper_active,moelab_active", [
    ("aoe-732m", 732_384_000, 247_352_064, 236_931_840),
    ("aoe-4b", 3_973_643_520, 1_183_102_720, 1_215_870_720),
])
def test_aoe_presets_count_the_published_sizes(name, total, paper_active, moelab_active):
    c = count_params(get_preset(name))
    assert (c.total_params, c.active_params_paper, c.active_params) == (total, paper_active, moelab_active)
    cfg = get_preset(name)
    E, L, D = cfg.moe.num_experts, cfg.moe.aoe.d_low, cfg.d_model
    assert c.active_params - c.active_params_paper == (E - 2) * L * D * cfg.num_layers - cfg.vocab_size * D
    assert c.aoe_cache_bytes_per_token == E * L * 4 * cfg.num_layers


def test_aoe_tiny_has_the_tiny_active_budget():
    a, t = count_params(get_preset("aoe-tiny")), count_params(get_preset("tiny"))
    assert abs(a.active_params_paper - t.active_params) / t.active_params < 0.005
    assert abs(a.total_params - t.total_params) / t.total_params < 0.005


@pytest.mark.parametrize("strategy", ["top_p", "expert_choice"])
def test_other_selection_strategies_on_the_norms(strategy):
    router = (RouterConfig(type="top_p", top_p=0.6, top_k=2) if strategy == "top_p"
              else RouterConfig(type="expert_choice", top_k=2, capacity_factor=1.0))
    layer = _layer(_cfg(E=4, router=router)).train()
    x = torch.randn(2, 8, 16)
    y, r = layer(x)
    probs = torch.softmax(expert_norms(layer.experts.low_rank_all(x.reshape(16, 16)), "l2"), -1)
    torch.testing.assert_close(r.probs_TE, probs)
    if strategy == "expert_choice":  # every expert takes exactly C = 16 * 2 / 4 tokens, top by score
        assert r.expert_counts().tolist() == [8, 8, 8, 8]
        top = probs.t().topk(8, dim=-1).indices
        assert all(set(r.token_idx_A[r.expert_idx_A == e].tolist()) == set(top[e].tolist()) for e in range(4))
    else:
        assert 1 <= r.experts_per_token().min() and (r.experts_per_token() >= 1).all()
    y.sum().backward()
    assert layer.experts.wdown_ELD.grad.abs().sum() > 0


def test_factorised_experts_with_a_router_and_the_large_router():
    cfg = _cfg(E=4, router_free=False)
    layer = _layer(cfg).eval()
    assert layer.router.weight.shape == (4, 16)
    x = torch.randn(1, 6, 16)
    y, r = layer(x)
    assert r.expert_cache_TEL is None
    from moelab.moe.experts import reference_moe
    torch.testing.assert_close(y[0], reference_moe(layer.experts, x[0], r.token_idx_A, r.expert_idx_A, r.weight_A),
                               rtol=1e-5, atol=1e-6)
    big = MoELayer(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, aoe=None, router=RouterConfig(
        top_k=2, hidden_dim=32))))
    assert big.router.hidden.shape == (32, 16) and big.router.weight.shape == (4, 32)
    assert big(x)[0].shape == x.shape


@pytest.mark.parametrize("build,field", [
    (lambda: _cfg(d_low=0), "moe.aoe.d_low"),
    (lambda: _cfg(d_low=16), "moe.aoe.d_low"),  # = d_model
    (lambda: _cfg(norm="l3"), "moe.aoe.norm"),
    (lambda: _cfg(router=RouterConfig(type="deepseek_v3", top_k=2)), "moe.router.type"),
    (lambda: _cfg(router=RouterConfig(type="noisy_topk", top_k=2)), "moe.router.type"),
    (lambda: _cfg(router=RouterConfig(top_k=2, jitter_eps=0.01)), "moe.router.jitter_eps"),
    (lambda: _cfg(router=RouterConfig(top_k=2, hidden_dim=8)), "moe.router.hidden_dim"),
    (lambda: _cfg(d_wide=0), "moe.aoe.d_wide"),
])
def test_bad_aoe_options_name_the_field(build, field):
    with pytest.raises(ConfigError) as err:
        build()
    assert field in str(err.value)


def test_aoe_cannot_export_to_hf(tmp_path):
    from moelab.interop.hf import export_hf

    with pytest.raises(MoelabError, match="Autonomy-of-Experts"):
        export_hf(build_model(_cfg()), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_aoe_tiny_trains_resumes_and_generates(tmp_path):
    from moelab.inference.generate import generate_ids
    from moelab.loading import load
    from moelab.train import TrainConfig, train
    from moelab.train.trainer import read_metrics

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"the {w} sat on the mat number {i}." * 4 for i, w in
                                  enumerate(["cat", "dog", "owl", "fox", "bee"] * 12)))
    model = dataclasses.replace(get_preset("aoe-tiny"), vocab_size=300, d_model=32, num_layers=2,
                                moe=dataclasses.replace(get_preset("aoe-tiny").moe, aoe=AoEConfig(d_low=8),
                                                        expert_ffn_dim=48))
    model.attention = AttentionConfig(num_heads=4, num_kv_heads=2)
    cfg = TrainConfig(model=model, data=str(corpus), steps=8, batch_size=4, seq_len=32, warmup_steps=2,
                      eval_every=0, eval_batches=1, save_every=4, progress=False)
    train(cfg, tmp_path / "full")
    from moelab.train import Trainer

    original, calls = Trainer.train_step, {"n": 0}

    def crashing(self, batches):
        calls["n"] += 1
        if calls["n"] == 6:  # dies in step 6; the last checkpoint is step 4
            raise KeyboardInterrupt
        return original(self, batches)

    Trainer.train_step = crashing
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "cut")
    finally:
        Trainer.train_step = original
    train(cfg, tmp_path / "cut", resume=True)
    a, b = load(tmp_path / "full"), load(tmp_path / "cut")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    rec = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "train"][-1]
    assert set(rec["aux"]) == {"load_balance"}
    assert len(rec["layers"]["load_entropy"]) == 2 and len(rec["layers"]["router_entropy"]) == 2
    assert 0 < rec["load_entropy"] <= torch.log(torch.tensor(8.0)).item() + 1e-6
    meta = next(r for r in read_metrics(tmp_path / "full") if r["kind"] == "meta")
    assert meta["balancing"]["losses"] == {"load_balance": 0.02}
    ids = torch.tensor([[1, 2, 3, 4]])
    with_cache = generate_ids(a, ids, 6, use_cache=True)
    assert torch.equal(with_cache, generate_ids(a, ids, 6, use_cache=False))


def test_aux_loss_is_eq_6_on_the_norms():
    # L_aux = alpha * n * sum_i f_i P_i, f_i = share of tokens with i in their top-K (sums to K),
    # P_i = mean softmax over all n norms; moelab's Switch loss has f summing to 1, so alpha_paper
    # 0.01 is load_balance_coef 0.01 * K.
    K, n = 2, 4
    layer = _layer(_cfg(E=n, K=K, router=RouterConfig(top_k=K, load_balance_coef=0.01 * K))).train()
    x = torch.randn(3, 7, 16)
    _, r = layer(x)
    norms = expert_norms(layer.experts.low_rank_all(x.reshape(21, 16)), "l2")
    top = norms.topk(K, dim=-1).indices
    f = torch.zeros(n).index_add_(0, top.reshape(-1), torch.ones(21 * K)) / 21
    P = norms.softmax(-1).mean(0)
    torch.testing.assert_close(r.aux_losses["load_balance"], 0.01 * n * (f * P).sum(), rtol=1e-5, atol=1e-7)


def test_aoe_gates_must_sum_to_one():
    with pytest.raises(ConfigError, match="moe.router.softmax_order"):
        _cfg(router=RouterConfig(top_k=2, softmax_order="softmax_then_topk"))
    _cfg(router=RouterConfig(top_k=2, softmax_order="softmax_then_topk", norm_topk_prob=True))  # = Alg. 2
