"""The AoE preliminary study (Lv et al. 2025 §3.1, Tables 1/6/7): routerless top-K by node norm."""

import json
import math

import pytest
import torch
from torch import nn

from moelab.checkpoint.model_files import save_model
from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.data import load_corpus, prepare_data, train_tokenizer
from moelab.errors import ConfigError, MoelabError
from moelab.experiments.routerless import (
    NODES,
    NORMS,
    cost_ratio,
    model_macs,
    routed_macs,
    routerless,
    routerless_macs,
    run_routerless_study,
)
from moelab.loading import load
from moelab.model import build_model
from moelab.train.trainer import evaluate
from tests.helpers import small_config


def constructed_model(**moe_kwargs) -> nn.Module:
    """Experts of different shapes so the norms rank them differently: expert e uses only its first
    F_e features and writes only its first D_e output dims (few large entries vs many small ones)."""
    model = build_model(small_config(num_shared_experts=1, shared_expert_gate=True, **moe_kwargs)).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            ex = layer.experts
            for e, (f, d) in enumerate([(2, 2), (6, 8), (12, 16), (24, 32)]):
                scale = (24 / f) ** 0.5 * 4
                ex.gate_EFD[e, f:] = 0
                ex.up_EFD[e, f:] = 0
                ex.down_EDF[e, :, f:] = 0
                ex.down_EDF[e, d:] = 0
                ex.gate_EFD[e] *= scale
                ex.up_EFD[e] *= scale
                ex.down_EDF[e] *= (32 / d) ** 0.5
    return model


def slow_node(ex, e: int, x_D: torch.Tensor, node: str) -> torch.Tensor:
    """One token, one expert, written out."""
    g = x_D @ ex.gate_EFD[e].t()
    p = x_D @ ex.up_EFD[e].t()
    return {"x_Wg": g, "x_Wp": p, "act_x_Wg": ex.act(g), "act_x_Wg_x_Wp": ex.act(g) * p,
            "output": ex.expert(e, x_D[None])[0]}[node]


def slow_norm(v: torch.Tensor, norm: str) -> float:
    a = v.abs().double()
    return {"l1": a.sum(), "l2": a.pow(2).sum().sqrt(), "linf": a.max()}[norm].item()


def slow_layer(layer, x_TD: torch.Tensor, node: str, norm: str, weighting: str = "norms"):
    """Per token: norms of every expert's node, top-K, weighted sum of outputs + shared; weights: the
    softmax of the chosen norms, or (weighting "router") the Mixtral router's softmax over the chosen
    experts' logits."""
    ex, K = layer.experts, layer.router_cfg.top_k
    assert layer.router_cfg.softmax_order == "topk_then_softmax"
    picks, out = [], torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        norms = [slow_norm(slow_node(ex, e, x_TD[t], node), norm) for e in range(ex.num_experts)]
        chosen = sorted(range(ex.num_experts), key=lambda e: -norms[e])[:K]
        logits = [float(x_TD[t] @ layer.router.weight[e]) for e in chosen]
        w = torch.tensor([norms[e] for e in chosen] if weighting == "norms" else logits).softmax(0)
        for k, e in enumerate(chosen):
            out[t] += w[k].float() * ex.expert(e, x_TD[t:t + 1])[0]
        picks.append(sorted(chosen))
    shared = torch.sigmoid(layer.shared_gate(x_TD)) * layer.shared(x_TD)
    return picks, out + shared


@pytest.mark.parametrize("weighting", ["router", "norms"])
@pytest.mark.parametrize("node", ["output", "act_x_Wg", "x_Wp", "act_x_Wg_x_Wp"])
def test_selection_and_output_match_slow_loop(node, weighting):
    model = constructed_model()
    layer = model.moe_layers()[0]
    x_BTD = torch.randn(2, 12, 32)
    x_TD = x_BTD.reshape(-1, 32)
    picks_by_norm = {}
    with torch.no_grad(), routerless(model, node=node, norm="l2"):
        for norm in NORMS:
            with routerless(model, node=node, norm=norm, weighting=weighting):  # nested: the inner one wins
                out_BTD, routing = layer(x_BTD)
            picks, expected_TD = slow_layer(layer, x_TD, node, norm, weighting)
            got = [sorted(r) for r in routing.expert_idx_A.view(-1, 2).tolist()]
            assert got == picks
            torch.testing.assert_close(out_BTD.reshape(-1, 32), expected_TD, rtol=1e-5, atol=1e-5)
            w_TK = routing.weight_A.view(-1, 2)
            torch.testing.assert_close(w_TK.sum(-1), torch.ones(24))
            picks_by_norm[norm] = picks
        assert "forward" in layer.__dict__  # the outer routerless is still on
    assert "forward" not in layer.__dict__
    # the example discriminates: L1 and L-inf choose different experts for some tokens
    assert picks_by_norm["l1"] != picks_by_norm["linf"]


def test_routerless_differs_from_router_and_restores_exactly():
    model = constructed_model()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        with routerless(model, node="x_Wg", norm="linf"):
            inside = model(ids).logits
            counts = model.moe_layers()[0].last_metrics["experts_per_token_mean"]
        after = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with routerless(model, node="output", norm="l1"):
                model(ids)
                raise RuntimeError("boom")
        after_error = model(ids).logits
    assert not torch.allclose(before, inside)
    assert counts == 2.0
    assert torch.equal(before, after) and torch.equal(before, after_error)
    assert all("forward" not in layer.__dict__ for layer in model.moe_layers())


def test_non_token_choice_router_uses_its_top_k():
    model = build_model(small_config(router=RouterConfig(type="expert_choice", top_k=3))).eval()
    with torch.no_grad(), routerless(model, node="act_x_Wg", norm="l2", weighting="norms"):
        model(torch.randint(0, 64, (2, 8)))
    with pytest.raises(ConfigError, match="no plain gate rule"), torch.no_grad():  # expert choice has no gates to reuse
        with routerless(model, node="act_x_Wg", norm="l2"):
            model(torch.randint(0, 64, (2, 8)))
    for layer in model.moe_layers():
        assert layer.last_metrics["experts_per_token_min"] == layer.last_metrics["experts_per_token_max"] == 3


def test_cost_ratios_by_hand():
    D, F, E, K = 32, 24, 4, 2  # D*F = 768
    assert routed_macs(D, F, E, K) == 128 + 2 * 3 * 768 == 4736
    expected = {"x_Wg": 4 * 768 + 2 * 2 * 768, "x_Wp": 6144, "act_x_Wg": 6144,
                "act_x_Wg_x_Wp": 4 * 2 * 768 + 2 * 768, "output": 4 * 3 * 768}
    assert expected == {"x_Wg": 6144, "x_Wp": 6144, "act_x_Wg": 6144, "act_x_Wg_x_Wp": 7680, "output": 9216}
    model = build_model(small_config())  # 2 MoE layers of these dims
    for node, macs in expected.items():
        assert routerless_macs(node, D, F, E, K) == macs
        assert cost_ratio(node, D, F, E, K) == pytest.approx(macs / 4736)
        assert model_macs(model, node) == 2 * macs
    assert model_macs(model) == 2 * 4736
    assert routed_macs(D, F, E, K, router_hidden=16) == 16 * (32 + 4) + 4608


def test_cost_counts_a_hidden_router_layer():
    if "hidden_dim" not in RouterConfig.__dataclass_fields__:
        pytest.skip("RouterConfig has no hidden_dim")
    model = build_model(small_config(router=RouterConfig(top_k=2, hidden_dim=16)))
    assert model_macs(model) == 2 * (16 * 32 + 16 * 4 + 4608)
    assert model_macs(model, "output") == 2 * 9216


def tiny_saved_model(tmp_path, moe: bool = True):
    """A random tiny model + a BPE tokenizer trained on a two-domain JSONL corpus, saved to disk."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(60):
        a, b = (int(v) for v in torch.randint(0, 90, (2,), generator=g))
        text = (" ".join(f"{a + k} plus {b} is {a + k + b}." for k in range(8)) if i % 2 else
                " ".join(["the quick brown fox jumps over the lazy dog"] * 4 + [str(a)]))
        lines.append(json.dumps({"text": text, "domain": "math" if i % 2 else "words"}))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    tok = train_tokenizer([json.loads(x)["text"] for x in lines], vocab_size=300)
    cfg = ModelConfig(vocab_size=300, d_model=32, num_layers=2, max_seq_len=32, dense_ffn_dim=48,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                      moe=MoEConfig(num_experts=4, expert_ffn_dim=24, router=RouterConfig(top_k=2)) if moe else None)
    torch.manual_seed(0)
    save_model(build_model(cfg), tmp_path / "model")
    tok.save(tmp_path / "model")
    return tmp_path / "model", corpus, tok


def test_study_end_to_end(tmp_path):
    source, corpus, tok = tiny_saved_model(tmp_path)
    out = tmp_path / "study"
    result = run_routerless_study(source, out, data=str(corpus), batch_size=4, quick=True, progress=False)
    assert json.loads((out / "result.json").read_text()) == result
    assert result["nodes"] == list(NODES) and result["norms"] == list(NORMS)
    assert result["seq_len"] == 32 and result["max_batches"] == 2
    rows = result["rows"]
    assert result["weightings"] == ["router", "norms"] and result["notes"] == []
    assert [(r["weighting"], r["node"], r["norm"]) for r in rows] == [(w, n, p) for w in ("router", "norms")
                                                                      for n in NODES for p in NORMS]
    for r in rows:
        assert math.isfinite(r["val_loss"]) and set(r["val_domains"]) == {"math", "words"}
        assert all(math.isfinite(v) for v in r["val_domains"].values())
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["delta_loss"] == pytest.approx(r["val_loss"] - result["routed"]["val_loss"])
        assert r["cost_ratio"] == pytest.approx(cost_ratio(r["node"], 32, 24, 4, 2))
    # the routed reference is evaluate() of the plain model on the same validation rows
    _, val = prepare_data(load_corpus(str(corpus), seed=0), tok, 32)
    ref = evaluate(load(source), val, 4, 2)
    assert result["routed"]["val_loss"] == ref["val_loss"]
    assert result["routed"]["val_domains"] == {d: v["loss"] for d, v in ref["domains"].items()}
    assert result["routed"]["cost_ratio"] == 1.0 and result["routed"]["macs_per_token"] == 2 * 4736
    assert len({r["val_loss"] for r in rows}) > 1  # the selections differ
    md = (out / "report.md").read_text()
    assert f"{ref['val_loss']:.4g}" in md and f"{rows[0]['val_loss']:.4g}" in md
    assert "plots/val_loss_by_node.png" in md and (out / "plots" / "val_loss_by_node.png").stat().st_size > 0
    assert (out / "report.html").is_file()


def test_study_subset_of_nodes_and_norms(tmp_path):
    source, corpus, _ = tiny_saved_model(tmp_path)
    result = run_routerless_study(source, tmp_path / "s", data=str(corpus), nodes=["output"], norms=["l2"],
                                  batch_size=2, max_batches=1, progress=False, weightings=["norms"])
    assert [(r["weighting"], r["node"], r["norm"]) for r in result["rows"]] == [("norms", "output", "l2")]
    assert result["rows"][0]["cost_ratio"] == pytest.approx(9216 / 4736)


def test_bad_inputs(tmp_path):
    dense_src, corpus, _ = tiny_saved_model(tmp_path, moe=False)
    with pytest.raises(MoelabError, match="no routed experts") as err:
        run_routerless_study(dense_src, tmp_path / "o", data=str(corpus), progress=False)
    assert str(dense_src) in str(err.value)
    with pytest.raises(MoelabError, match="no routed experts"):
        with routerless(load(dense_src)):
            pass
    model = build_model(small_config())
    with pytest.raises(ConfigError, match="node='x_Wq'.*act_x_Wg_x_Wp"):
        with routerless(model, node="x_Wq"):
            pass
    with pytest.raises(ConfigError, match="norm='l3'.*linf"):
        with routerless(model, norm="l3"):
            pass
    with pytest.raises(ConfigError, match="norm='max'"):
        run_routerless_study(dense_src, tmp_path / "o", norms=["max"], progress=False)
    model.moe_layers()[1].experts = nn.Linear(4, 4)  # e.g. an expert type without gate/up/down
    with pytest.raises(MoelabError, match="block 1 .*Linear"):
        with routerless(model):
            pass
    assert all("forward" not in layer.__dict__ for layer in model.moe_layers())


def test_weighting_keeps_the_router_gate_rule_and_its_scale():
    """Issue 22.8: the default keeps the router's own gates for the chosen experts; the softmax of norms
    applies routed_scaling_factor only when the router's own gates sum to 1 (DeepSeek-V3), not where the
    scale compensates gates that sum to less (DeepSeek-V2, un-renormalised)."""
    from moelab.experiments.routerless import routerless_forward

    x = torch.randn(1, 6, 32)
    for router, own_sum in ((RouterConfig(type="deepseek_v2", top_k=2, routed_scaling_factor=16.0), None),
                            (RouterConfig(type="deepseek_v3", top_k=2, routed_scaling_factor=2.5), 2.5)):
        layer = build_model(small_config(router=router)).eval().moe_layers()[0]
        with torch.no_grad():
            _, r_norms = routerless_forward(layer, x, "output", "l2", weighting="norms")
            _, r_router = routerless_forward(layer, x, "output", "l2", weighting="router")
            logits = layer.router.logits(x.reshape(6, 32))
        idx = r_router.expert_idx_A.view(6, 2)
        if router.type == "deepseek_v2":  # softmax gates, not renormalised, x 16
            expected = logits.softmax(-1).gather(-1, idx) * 16.0
            torch.testing.assert_close(r_norms.weight_A.view(6, 2).sum(-1), torch.ones(6))
        else:  # sigmoid scores renormalised over the chosen, x 2.5
            s = torch.sigmoid(logits).gather(-1, idx)
            expected = s / s.sum(-1, keepdim=True) * 2.5
            torch.testing.assert_close(r_norms.weight_A.view(6, 2).sum(-1), torch.full((6,), own_sum))
        torch.testing.assert_close(r_router.weight_A.view(6, 2), expected)
    with pytest.raises(ConfigError, match="weighting"):
        with routerless(constructed_model(), weighting="softmax"):
            pass



@pytest.mark.parametrize("router", [
    RouterConfig(type="topk", top_k=2, routed_scaling_factor=2.0),  # topk ignores the scale
    RouterConfig(type="topk", top_k=2, softmax_order="softmax_then_topk", norm_topk_prob=True, topk_norm_p=2.0),
    RouterConfig(type="topk", top_k=2, softmax_order="softmax_then_topk"),
    RouterConfig(type="switch", top_k=1, norm_topk_prob=True, routed_scaling_factor=2.0),  # Switch: p_max, unscaled
    RouterConfig(type="deepseek_v2", top_k=2, routed_scaling_factor=16.0),
    RouterConfig(type="deepseek_v3", top_k=2, routed_scaling_factor=2.5),
], ids=["topk-scale-ignored", "topk-p2", "topk-unnormalised", "switch", "deepseek_v2", "deepseek_v3"])
def test_router_gates_reproduce_each_routers_own_gates(router):
    """Given the experts the router itself picks, router_gates gives exactly the router's weights."""
    from moelab.experiments.routerless import gates_sum_to_one, router_gates

    layer = build_model(small_config(router=router)).eval().moe_layers()[0]
    x = torch.randn(10, 32)
    with torch.no_grad():
        r = layer.router(x)
        K = router.top_k
        torch.testing.assert_close(router_gates(layer, x, r.expert_idx_A.view(10, K)), r.weight_A.view(10, K))
    assert gates_sum_to_one(router) == (router.type == "topk" and router.softmax_order == "topk_then_softmax"
                                        or router.type == "deepseek_v3")
