"""`moelab analyze`: statistics checked on planted routing, the recorder, the report, bad input."""

import json
from math import comb

import numpy as np
import pytest
import torch

from moelab.analysis import RoutingRecorder, analyze, similarity, stats
from moelab.checkpoint.model_files import save_model
from moelab.cli import main
from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.data import train_tokenizer
from moelab.errors import ConfigError, DataError, MoelabError
from moelab.model import build_model

E = 4
TEXTS = ["the cat sat on the mat and the dog sat on the log", "one two three four five six seven eight nine ten",
         "def f(x): return x + 1 if x else x - 1", "alpha beta gamma delta epsilon zeta eta theta"]


def planted_model(vocab: int, capacity_factor=None) -> torch.nn.Module:
    """One MoE block whose routing is a function of the token id: attention writes nothing, the
    embedding of token i is 10 * onehot(i mod E) + 5 * onehot((i + 1) mod E), the router reads those
    dims, so token i's choices are [i mod E, (i + 1) mod E] in that order."""
    cfg = ModelConfig(vocab_size=vocab, d_model=8, num_layers=1, max_seq_len=64, dense_ffn_dim=16,
                      attention=AttentionConfig(num_heads=2),
                      moe=MoEConfig(num_experts=E, expert_ffn_dim=8, router=RouterConfig(
                          top_k=2, eval_capacity_factor=capacity_factor)))
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.blocks[0].attn.o_proj.weight.zero_()
        emb = torch.zeros(vocab, 8)
        ids = torch.arange(vocab)
        emb[ids, ids % E] = 10.0
        emb[ids, (ids + 1) % E] = 5.0
        model.embed.weight.copy_(emb)
        model.blocks[0].ffn_norm.weight.fill_(1.0)
        router = torch.zeros(E, 8)
        router[:, :E] = torch.eye(E)
        model.blocks[0].ffn.router.weight.copy_(router)
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    tok = train_tokenizer(TEXTS * 3, vocab_size=300)
    model = planted_model(tok.vocab_size)
    save_model(model, d / "model")
    tok.save(d / "model" / "tokenizer.json")
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t, "domain": ["prose", "code"][i % 2]}) + "\n"
                            for i, t in enumerate(TEXTS)))
    return d / "model", data, tok


def test_planted_routing_is_found(planted, tmp_path):
    model_dir, data, tok = planted
    r = analyze(model_dir, tmp_path / "an", data=str(data), expert_outputs=True, progress=False, min_count=1)
    assert r["layers"] == [0] and r["tokens"] == sum(len(tok.encode(t, add_special_tokens=True)) for t in TEXTS)
    ts = r["token_specialization"]["0"]
    assert ts["value"] == 1.0 and ts["chance"] < 1.0  # routing is a function of the id alone
    # hand count of the consecutive rates over within-document pairs only
    first = either = pairs = 0
    for t in TEXTS:
        ids = tok.encode(t, add_special_tokens=True)
        for a, b in zip(ids, ids[1:]):
            sa, sb = {a % E, (a + 1) % E}, {b % E, (b + 1) % E}
            first += a % E == b % E
            either += bool(sa & sb)
            pairs += 1
    c = r["consecutive"]["0"]
    assert c["pairs"] == pairs
    assert c["first"] == pytest.approx(first / pairs) and c["either"] == pytest.approx(either / pairs)
    assert (c["random_first"], c["random_either"]) == (0.25, pytest.approx(1 - comb(2, 2) / comb(4, 2)))
    for dom, load in r["expert_load"]["0"].items():
        assert sum(load) == pytest.approx(1.0)
    assert set(r["expert_load"]["0"]) == {"prose", "code", "all"}
    assert len(r["router_vs_norm"]["0"]["rank_matrix"]) == E
    assert (tmp_path / "an" / "report.html").read_text().count("data:image/png;base64") >= 5
    saved = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert saved["consecutive"] == r["consecutive"] and saved["drop_by_position"] == {}


def test_recorder_leaves_logits_unchanged_and_records_choice_order(planted):
    model_dir, _, _ = planted
    from moelab.loading import load

    model = load(model_dir)
    ids = torch.arange(1, 13).view(2, 6)
    ref = model(ids).logits
    with RoutingRecorder(model, expert_outputs=True) as rec:
        out = model(ids).logits
    assert torch.equal(out, ref)
    experts = rec.traces[0].arrays()["experts"]
    assert experts.tolist() == [[i % E, (i + 1) % E] for i in range(1, 13)]
    assert torch.equal(model(ids).logits, ref)  # detached: hooks removed


def test_one_token_documents_never_pair():
    doc = np.arange(10)  # every token its own document
    pos = np.zeros(10, dtype=np.int64)
    experts = np.zeros((10, 2), dtype=np.int64)
    c = stats.consecutive(experts, doc, pos, np.zeros(10, dtype=np.int64), ["all"], 4, 2)
    assert c["pairs"] == 0 and c["first"] == 0.0
    # two documents back to back: the pair across the boundary is not counted
    doc2 = np.array([0, 0, 0, 1, 1])
    pos2 = np.array([0, 1, 2, 0, 1])
    assert stats.adjacent_pairs(doc2, pos2).tolist() == [0, 1, 3]


def test_uniform_random_routing_gives_the_random_baselines():
    rng = np.random.default_rng(0)
    N, E8, K = 200_000, 8, 2
    experts = np.argsort(rng.random((N, E8)), axis=1)[:, :K]  # K distinct uniform experts per token
    doc = np.zeros(N, dtype=np.int64)
    c = stats.consecutive(experts, doc, np.arange(N), doc, ["all"], E8, K)
    assert abs(c["first"] - 1 / 8) < 0.005 and abs(c["either"] - 13 / 28) < 0.005
    assert c["random_either"] == pytest.approx(13 / 28)
    spec = stats.token_specialization(experts[:, 0], rng.integers(0, 50, N))
    assert spec < 0.2  # ~ the most common of 8 equally likely experts per id
    sp = stats.routing_spread(experts[:, 0], rng.integers(0, 50, N), np.arange(N) % 64, E8, seed=0)
    assert abs(sp["by_token"] - sp["random_by_token"]) < 0.005  # uniform load: chance = what it scores


def test_identical_and_scaled_experts_have_similarity_one():
    from moelab.moe.layer import MoELayer
    from tests.helpers import small_config

    layer = MoELayer(small_config())
    with torch.no_grad():
        for p in (layer.experts.gate_EFD, layer.experts.up_EFD, layer.experts.down_EDF):
            p.normal_()
            p[1] = p[0]
            p[2] = 3.0 * p[0]
    sim = similarity.weight_similarity(layer)
    for k in ("gate", "up", "down"):
        assert sim[k][0][1] == pytest.approx(1.0) and sim[k][0][2] == pytest.approx(1.0)
        assert abs(sim[k][0][3]) < 0.3
    matched = similarity.neuron_matched_similarity(layer)
    assert matched["gate"][0][1] == pytest.approx(1.0)


def test_router_vs_norm_rank_matrix_by_hand():
    norms = np.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    scores = np.array([[0.5, 0.2, 0.3], [0.6, 0.3, 0.1]])
    m = stats.rank_matrix(norms, scores)
    # token 0: norm order e0, e2, e1 has score ranks 0, 1, 2; token 1: norm order e2, e1, e0 -> 2, 1, 0
    assert m.tolist() == [[1, 0, 1], [0, 2, 0], [1, 0, 1]]
    rv = stats.router_vs_norm(np.array([0, 0]), norms, scores)
    assert rv["top1_is_max_norm"] == 0.5


def test_drops_by_position_with_a_capacity(tmp_path):
    tok = train_tokenizer(TEXTS * 3, vocab_size=300)
    model = planted_model(tok.vocab_size, capacity_factor=0.5)
    save_model(model, tmp_path / "m")
    tok.save(tmp_path / "m" / "tokenizer.json")
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(TEXTS))
    r = analyze(tmp_path / "m", tmp_path / "an", data=str(data), expert_outputs=False, progress=False, batch_size=2)
    drops = r["drop_by_position"]["0"]
    assert len(drops) == r["seq_len"] and any(v > 0 for v in drops if v == v)
    assert r["domains"] == ["all"] and "no domain labels" in r["notes"][0]


def test_bad_input(planted, tmp_path):
    model_dir, data, _ = planted
    with pytest.raises(ConfigError, match="--max-tokens"):
        analyze(model_dir, tmp_path / "a", data=str(data), max_tokens=0, progress=False)
    with pytest.raises(ConfigError, match="--layers"):
        analyze(model_dir, tmp_path / "a", data=str(data), layers=[3], progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        analyze(model_dir, tmp_path / "a", data=str(empty), progress=False)
    dense = build_model(ModelConfig(vocab_size=300, d_model=8, num_layers=1, attention=AttentionConfig(num_heads=2),
                                    moe=None))
    save_model(dense, tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    with pytest.raises(MoelabError, match="no MoE layers"):
        analyze(tmp_path / "dense", tmp_path / "a", data=str(data), progress=False)
    assert main(["analyze", str(tmp_path / "dense"), "--data", str(data), "--out", str(tmp_path / "b")]) == 2


def test_analyze_an_hf_checkpoint_made_by_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tests.parity.hf_models import build_hf_model

    tok = train_tokenizer(TEXTS * 3, vocab_size=300)
    hf = build_hf_model("mixtral", dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "domain": "x"}) + "\n" for t in TEXTS))
    assert main(["analyze", str(tmp_path / "hf"), "--data", str(data), "--out", str(tmp_path / "an"),
                 "--no-progress"]) == 0
    r = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert r["layers"] == [0, 1] and set(r["weight_similarity"]["1"]) == {"gate", "up", "down"}
    assert 0 <= r["router_top1_is_max_norm"]["0"] <= 1
    assert transformers is not None and "report:" in capsys.readouterr().out


def test_all_expert_outputs_equal_the_per_expert_loop():
    from moelab.analysis.recorder import all_expert_outputs
    from moelab.moe.layer import MoELayer
    from tests.helpers import small_config

    layer = MoELayer(small_config())
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(7, 32)
    ref = torch.stack([layer.experts.expert(e, x) for e in range(4)], dim=1)
    torch.testing.assert_close(all_expert_outputs(layer, x), ref, rtol=1e-5, atol=1e-5)


def test_routing_over_training_compares_every_checkpoint_with_the_final(tmp_path):
    from moelab.analysis.training import routing_over_training
    from moelab.train import TrainConfig, train

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(TEXTS * 6))
    model = ModelConfig(vocab_size=300, d_model=16, num_layers=2, max_seq_len=32, dense_ffn_dim=32,
                        attention=AttentionConfig(num_heads=2),
                        moe=MoEConfig(num_experts=4, expert_ffn_dim=16, router=RouterConfig(top_k=2)))
    cfg = TrainConfig(model=model, data=str(corpus), steps=6, batch_size=2, seq_len=16, warmup_steps=1,
                      eval_every=0, eval_batches=1, save_every=2, keep_last=3, progress=False)
    train(cfg, tmp_path / "run")
    r = analyze(tmp_path / "run", tmp_path / "an", data=str(corpus), expert_outputs=False, progress=False)
    t = r["routing_over_training"]
    assert t["steps"] == [2, 4, 6]
    for layer, agree in t["agreement"].items():
        assert len(agree) == 3 and agree[-1] == 1.0 and all(0.0 <= a <= 1.0 for a in agree)
    assert routing_over_training(tmp_path / "an", [], 2, [0]) is None  # not a run directory


def test_padding_is_not_routed_during_analysis():
    """Issue 22.1: windows of unequal length are right-padded into a batch; the pads must take no expert
    slot. With an eval capacity, every expert keeps min(load, C) of its real assignments, C computed from
    the real tokens only, so the recorded drops are exactly the overflow counted by hand."""
    import math

    from moelab.analysis.recorder import record

    vocab = 16
    model = planted_model(vocab, capacity_factor=1.0)
    gen = torch.Generator().manual_seed(0)
    lengths = [32, 32, 8, 8, 8, 8, 8, 8]
    # token ids 1..15 skewed toward id 1 (experts 1 and 2 overloaded); the pad id 0 would route to experts 0, 1
    windows = [(r, 0, (1 + torch.randint(0, 15, (n,), generator=gen) * (torch.rand(n, generator=gen) < 0.4)).tolist())
               for r, n in enumerate(lengths)]
    rec, cols = record(model, windows, batch_size=8, layers=None, expert_outputs=True, progress=False)
    a = rec.traces[0].arrays()
    ids = np.concatenate([w for _, _, w in windows])
    N = len(ids)
    assert a["experts"].shape[0] == N == len(cols["token"]) and a["output_norms"].shape == (N, E)
    assert (a["experts"][:, 0] == ids % E).all() and (a["experts"][:, 1] == (ids + 1) % E).all()
    cap = math.ceil(1.0 * N * 2 / E)  # Switch's C = ceil(cf * T * K / E) over the real tokens
    load = np.bincount(np.concatenate([ids % E, (ids + 1) % E]), minlength=E)
    assert int(a["dropped"].sum()) == int(np.maximum(load - cap, 0).sum()) > 0


def test_recorder_works_on_a_masked_forward():
    """The layer routes only the real tokens of a masked forward; the recorder keeps exactly those."""
    model = planted_model(12)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    with RoutingRecorder(model, expert_outputs=True) as rec:
        rec.set_mask(mask)
        model(ids, attention_mask=mask)
    a = rec.traces[0].arrays()
    real = ids[mask].numpy()
    assert (a["experts"][:, 0] == real % E).all() and a["output_norms"].shape == (6, E)


def test_output_similarity_sums_angular_and_cosine():
    """Issue 22.4: A Closer Look's heat maps average 1 - arccos(cos)/pi; orthogonal outputs score 0.5."""
    y = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]],     # token 0: e0 ⟂ e1, e2 = -e0
                      [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])     # token 1: e0-e1 45 degrees, e0-e2 45, e1 ⟂ e2
    s = similarity.output_similarity_sums(y)
    assert np.allclose(np.diag(s["angular"]), 2) and np.allclose(np.diag(s["cosine"]), 2)
    assert s["angular"][0, 1] == pytest.approx(0.5 + 0.75) and s["cosine"][0, 1] == pytest.approx(0 + 2 ** -0.5)
    assert s["angular"][0, 2] == pytest.approx(0.0 + 0.75) and s["cosine"][0, 2] == pytest.approx(-1 + 2 ** -0.5)
    assert s["angular"][1, 2] == pytest.approx(0.5 + 0.5) and s["cosine"][1, 2] == pytest.approx(0 + 0)


def test_analyze_output_similarity_is_angular_by_default(planted, tmp_path):
    model_dir, data, _ = planted
    r = analyze(model_dir, tmp_path / "a", data=str(data), progress=False)
    c = analyze(model_dir, tmp_path / "c", data=str(data), progress=False, output_similarity="cosine")
    ang, cos = np.array(r["output_similarity"]["0"]), np.array(c["output_similarity"]["0"])
    assert r["output_similarity_measure"] == "angular" and c["output_similarity_measure"] == "cosine"
    assert np.allclose(np.diag(ang), 1) and (ang >= 0).all() and (ang <= 1 + 1e-9).all()
    assert not np.allclose(ang, cos)
    with pytest.raises(ConfigError, match="output-similarity"):
        analyze(model_dir, tmp_path / "x", data=str(data), progress=False, output_similarity="euclid")


def test_neuron_matching_is_per_matrix():
    """Issue 22.5: A Closer Look matches the neurons of each weight matrix separately (one Hungarian
    permutation and one Kendall tau per matrix). Expert 1 = expert 0 with its gate rows, up rows and down
    columns each shuffled by a different permutation: every matrix matches exactly (similarity 1)."""
    from moelab.moe.layer import MoELayer
    from tests.helpers import small_config

    layer = MoELayer(small_config())
    F = layer.experts.gate_EFD.shape[1]
    g = torch.Generator().manual_seed(0)
    perms = {k: torch.randperm(F, generator=g) for k in ("gate", "up", "down")}
    with torch.no_grad():
        ex = layer.experts
        for p in (ex.gate_EFD, ex.up_EFD, ex.down_EDF):
            p.normal_(generator=g)
        ex.gate_EFD[1] = ex.gate_EFD[0][perms["gate"]]
        ex.up_EFD[1] = ex.up_EFD[0][perms["up"]]
        ex.down_EDF[1] = ex.down_EDF[0][:, perms["down"]]
    matched = similarity.neuron_matched_similarity(layer)
    for k in ("gate", "up", "down"):
        assert matched[k][0][1] == pytest.approx(1.0, abs=1e-6), k
        assert matched[k][1][0] == matched[k][0][1] and matched[k][0][0] == 1.0
    # one permutation shared by the three matrices (the same function, neurons reordered) matches too
    with torch.no_grad():
        ex.gate_EFD[2] = ex.gate_EFD[0][perms["gate"]]
        ex.up_EFD[2] = ex.up_EFD[0][perms["gate"]]
        ex.down_EDF[2] = ex.down_EDF[0][:, perms["gate"]]
    shared = similarity.neuron_matched_similarity(layer)
    assert all(shared[k][0][2] == pytest.approx(1.0, abs=1e-6) for k in ("gate", "up", "down"))
    # Kendall's tau of each matrix's matching against the identity, by scipy on the planted permutation
    from scipy.stats import kendalltau

    for k in ("gate", "up", "down"):
        inverse = torch.argsort(perms[k]).numpy()
        assert matched["kendall_tau"][k][1][0] == pytest.approx(kendalltau(np.arange(F), inverse).statistic)


def test_chance_levels_keep_the_load():
    """Issue 22.3: a router that ignores token and position but loads its experts unevenly. Against a
    uniform-routing baseline its position groups looked spread (0.068 vs a stated 0.016) and its token ids
    specialised (0.18 at 100k tokens); the permutation chance levels match what it scores."""
    rng = np.random.default_rng(1)
    N, E8 = 100_000, 8
    load = np.array([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    top1 = rng.choice(E8, size=N, p=load)  # independent of token and position
    token = np.minimum(rng.zipf(1.3, N), 2047)  # vocab 2048, Zipf-like: many rare ids
    pos = np.tile(np.arange(256), N // 256 + 1)[:N]
    sp = stats.routing_spread(top1, token, pos, E8, min_count=128, seed=0)
    assert sp["by_position"] > 0.1  # uneven load alone spreads every position group
    assert abs(sp["by_position"] - sp["random_by_position"]) < 3 * sp["random_by_position_std"] + 1e-3
    assert abs(sp["by_token"] - sp["random_by_token"]) < 3 * sp["random_by_token_std"] + 1e-3
    ts = stats.specialization_with_chance(top1, token, min_count=128, seed=0)
    assert stats.token_specialization(top1, token) > ts["value"]  # rare ids inflate the unfiltered figure
    assert abs(ts["value"] - ts["chance"]) < 3 * ts["chance_std"] + 1e-3 and ts["ids"] > 5
    # a router that follows the token id scores far above its chance level
    follow = token % E8
    ts2 = stats.specialization_with_chance(follow, token, min_count=128, seed=0)
    assert ts2["value"] == 1.0 and ts2["chance"] < 0.6


def test_routing_over_training_per_token_id_and_chance():
    """Issue 22.6: OpenMoE compares per-token-id routing distributions. A checkpoint whose every id has the
    final distribution but in another token order agrees per id (1.0) though not token by token, and each
    measure stands beside its permutation chance level."""
    from moelab.analysis.training import agreement_with_final

    rng = np.random.default_rng(0)
    token = np.repeat(np.arange(8), 100)
    final = np.where(rng.random(800) < 0.5, token % E, (token + 1) % E)
    shuffled = final.copy()
    for i in range(8):  # same per-id distribution, tokens reordered within the id
        where = np.nonzero(token == i)[0]
        shuffled[where] = rng.permutation(final[where])
    r = agreement_with_final([shuffled, final], token, E, min_count=8, seed=0)
    assert r["id_agreement"] == [pytest.approx(1.0), pytest.approx(1.0)] and r["ids"] == 8
    assert 0.35 < r["agreement"][0] < 0.65 and r["agreement"][1] == 1.0
    # chance: the choices permuted over all tokens keep the load but lose the ids
    load = np.bincount(final, minlength=E) / 800
    assert r["agreement_chance"][1] == pytest.approx((load ** 2).sum(), abs=0.03)
    assert r["id_agreement_chance"][0] < 0.7


def test_consecutive_rates_share_one_denominator():
    """Issue 22.7: a token with no expert (expert choice) joins no pair of either rate."""
    experts = np.array([[0, 1], [0, 2], [-1, -1], [3, 1], [3, 0]])
    doc, pos = np.zeros(5, dtype=np.int64), np.arange(5)
    c = stats.consecutive(experts, doc, pos, doc, ["all"], 4, 2)
    # pairs (0,1) and (3,4) have experts on both sides: first 2/2, either 2/2
    assert c["pairs"] == 2 and c["first"] == 1.0 and c["either"] == 1.0


def test_router_vs_norm_ignores_a_selection_bias():
    """Issue 22.7: with DeepSeek-V3's bias the selected top-1 (by s + b) can differ from the highest score
    s; both norm statistics compare the norms with the scores."""
    norms = np.array([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]])
    scores = np.array([[0.5, 0.2, 0.3], [0.2, 0.5, 0.3]])
    biased_top1 = np.array([2, 2])  # the bias moved both tokens to expert 2
    rv = stats.router_vs_norm(biased_top1, norms, scores)
    assert rv["top1_is_max_norm"] == 1.0 and rv["diagonal_frac"] == 1.0
