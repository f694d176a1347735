"""Every balance loss against its formula at a fixed input and at its known minimum / balance value."""

import math

import pytest
import torch

from moelab.config import RouterConfig
from moelab.model import build_model
from moelab.moe.balancing import (comm_balance_loss, cv_squared, device_balance_loss, entropy_loss,
                                  expert_balance_loss, importance_loss, noisy_load_loss, sequence_balance_loss,
                                  switch_load_balance_loss)
from moelab.moe.metrics import load_balance_metrics
from tests.helpers import small_config

PROBS = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.1, 0.2, 0.6]])
# top-2 of each row (token-major); token 2 ties, we choose experts 2, 3
TOKEN = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
EXPERT = torch.tensor([0, 1, 1, 2, 2, 3, 3, 2])
WEIGHT = torch.tensor([0.7, 0.2, 0.6, 0.2, 0.25, 0.25, 0.6, 0.2])


def _pop_cv2(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs) / m ** 2


def test_cv_squared_and_importance_loss():
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(_pop_cv2([1, 2, 3]), rel=1e-6)
    importance = [0.7, 0.2 + 0.6, 0.2 + 0.25 + 0.2, 0.25 + 0.6]
    assert importance_loss(WEIGHT, EXPERT, 4).item() == pytest.approx(_pop_cv2(importance), rel=1e-6)
    # minimum 0 when every expert receives the same gate mass
    assert importance_loss(torch.full((8,), 0.5), torch.arange(8) % 4, 4).item() == pytest.approx(0.0, abs=1e-12)


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_noisy_load_loss_by_hand():
    clean = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]])
    noisy = clean + torch.tensor([[0.1, -0.2, 0.3], [-0.3, 0.4, 0.0]])  # [[1.1,-.2,-.7],[.2,.6,.1]]
    std = torch.tensor([[1.0, 0.5, 2.0], [0.5, 1.0, 0.25]])
    # k = 1: expert in the top-1 compares with the 2nd largest of H, others with the largest
    P = [[_phi((1.0 - -0.2) / 1.0), _phi((0.0 - 1.1) / 0.5), _phi((-1.0 - 1.1) / 2.0)],
         [_phi((0.5 - 0.6) / 0.5), _phi((0.2 - 0.2) / 1.0), _phi((0.1 - 0.6) / 0.25)]]
    load = [P[0][i] + P[1][i] for i in range(3)]
    assert noisy_load_loss(clean, noisy, std, 1).item() == pytest.approx(_pop_cv2(load), rel=1e-5)
    # k = 2: in-top-2 experts compare with the 3rd largest, the other with the 2nd largest
    P2 = [[_phi((1.0 - -0.7) / 1.0), _phi((0.0 - -0.7) / 0.5), _phi((-1.0 - -0.2) / 2.0)],
          [_phi((0.5 - 0.1) / 0.5), _phi((0.2 - 0.1) / 1.0), _phi((0.1 - 0.2) / 0.25)]]
    load2 = [P2[0][i] + P2[1][i] for i in range(3)]
    assert noisy_load_loss(clean, noisy, std, 2).item() == pytest.approx(_pop_cv2(load2), rel=1e-5)
    # symmetric experts: equal smooth load, loss 0 (its minimum)
    sym = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert noisy_load_loss(sym, sym, torch.ones(2, 2), 1).item() == pytest.approx(0.0, abs=1e-10)


def test_entropy_loss_formula_and_extremes():
    expected = sum(-sum(p * math.log(p) for p in row if p > 0) for row in PROBS.tolist()) / 4
    assert entropy_loss(PROBS).item() == pytest.approx(expected, rel=1e-6)
    assert entropy_loss(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-12)  # minimum: one-hot
    assert entropy_loss(torch.full((3, 8), 1 / 8)).item() == pytest.approx(math.log(8), rel=1e-6)


def test_expert_balance_loss_formula_equals_switch_and_is_one_at_balance():
    T, E, K = 4, 4, 2
    counts = [1, 2, 3, 2]
    f = [E / (K * T) * c for c in counts]
    P = PROBS.mean(0).tolist()
    expected = sum(fi * pi for fi, pi in zip(f, P))
    assert expert_balance_loss(PROBS, EXPERT, K).item() == pytest.approx(expected, rel=1e-6)
    assert expert_balance_loss(PROBS, EXPERT, K).item() == pytest.approx(
        switch_load_balance_loss(PROBS, EXPERT).item(), rel=1e-6)
    uniform = torch.full((8, 4), 0.25)
    assert expert_balance_loss(uniform, torch.arange(16) % 4, 2).item() == pytest.approx(1.0, rel=1e-6)


def test_device_balance_loss_formula_and_balance():
    T, E, K, D = 4, 4, 2, 2
    f = [E / (K * T) * c for c in [1, 2, 3, 2]]
    P = PROBS.mean(0).tolist()
    expected = ((f[0] + f[1]) / 2) * (P[0] + P[1]) + ((f[2] + f[3]) / 2) * (P[2] + P[3])
    assert device_balance_loss(PROBS, EXPERT, K, D).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.full((8, 4), 0.25)
    assert device_balance_loss(uniform, torch.arange(16) % 4, 2, 2).item() == pytest.approx(1.0, rel=1e-6)


def test_comm_balance_loss_formula_and_balance():
    T, D, M = 4, 2, 1
    # devices {0,1}, {2,3}: token 0 -> d0; token 1 -> d0, d1; token 2 -> d1; token 3 -> d1
    sent = [2, 3]
    f = [D / (M * T) * s for s in sent]
    P = PROBS.mean(0).tolist()
    expected = f[0] * (P[0] + P[1]) + f[1] * (P[2] + P[3])
    assert comm_balance_loss(PROBS, TOKEN, EXPERT, D, M).item() == pytest.approx(expected, rel=1e-6)
    # each token on exactly one of 2 devices, half each, uniform P: loss 1
    uniform = torch.full((4, 4), 0.25)
    tok, exp = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])
    assert comm_balance_loss(uniform, tok, exp, 2, 1).item() == pytest.approx(1.0, rel=1e-6)


def test_sequence_balance_loss_formula_and_balance():
    # 2 sequences of 2 tokens, top-1, sigmoid-like scores normalised inside
    scores = torch.tensor([[0.9, 0.3], [0.6, 0.6], [0.2, 0.8], [0.5, 0.1]])
    token, expert = torch.arange(4), torch.tensor([0, 0, 1, 0])
    s = (scores / scores.sum(-1, keepdim=True)).tolist()
    E, K, S = 2, 1, 2
    loss0 = sum(E / (K * S) * c * p for c, p in zip([2, 0], [(s[0][i] + s[1][i]) / 2 for i in range(2)]))
    loss1 = sum(E / (K * S) * c * p for c, p in zip([1, 1], [(s[2][i] + s[3][i]) / 2 for i in range(2)]))
    got = sequence_balance_loss(scores, token, expert, seq_len=2, top_k=1).item()
    assert got == pytest.approx((loss0 + loss1) / 2, rel=1e-6)
    # balanced within every sequence, equal scores: 1
    assert sequence_balance_loss(torch.ones(4, 2), token, torch.tensor([0, 1, 1, 0]), 2, 1).item() == pytest.approx(1.0)
    # seq 0 sends both tokens to e0, seq 1 both to e1: balanced over the batch (expert-level loss 1)
    # but not within each sequence, which only the sequence-wise loss sees
    tok_imb = torch.tensor([0, 0, 1, 1])
    peaked = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert sequence_balance_loss(peaked, torch.arange(4), tok_imb, 2, 1).item() == pytest.approx(1.8, rel=1e-6)
    assert expert_balance_loss(peaked, tok_imb, 1).item() == pytest.approx(1.0, rel=1e-6)


def test_load_metrics():
    m = load_balance_metrics(torch.tensor([6, 2, 0, 0]))
    assert m["max_load_ratio"] == pytest.approx(3.0) and m["max_vio"] == pytest.approx(2.0)
    assert m["cv"] == pytest.approx(math.sqrt(_pop_cv2([6, 2, 0, 0])), rel=1e-6)
    assert m["dead_expert_frac"] == 0.5
    assert load_balance_metrics(torch.tensor([3, 3, 3]))["max_vio"] == 0.0


def test_every_loss_logged_by_name_and_weighted():
    coefs = dict(load_balance_coef=0.01, z_loss_coef=1e-3, importance_loss_coef=0.1, entropy_loss_coef=1e-4,
                 expert_balance_coef=0.003, device_balance_coef=0.05, comm_balance_coef=0.02, seq_balance_coef=1e-4)
    cfg = small_config(router=RouterConfig(type="deepseek_v2", top_k=2, n_group=2, topk_group=1, balance_scope="batch",
                                           **coefs))
    model = build_model(cfg)
    routings = []
    for layer in model.moe_layers():
        layer.register_forward_hook(lambda mod, inp, out: routings.append(out[1]))
    ids = torch.randint(0, 64, (3, 10))
    out = model(ids, labels=ids)
    names = {"load_balance", "z_loss", "importance", "entropy", "expert_balance", "device_balance",
             "comm_balance", "seq_balance"}
    assert set(out.aux_losses) == names
    r = routings[0]
    assert r.aux_losses["device_balance"].item() == pytest.approx(
        0.05 * device_balance_loss(r.probs_TE, r.expert_idx_A, 2, 2).item(), rel=1e-6)
    # the sequence-wise loss counts each token's top-2 of the scores, not the group-limited selection (V3 eq. 18)
    raw_TK = r.probs_TE.topk(2, dim=-1).indices
    assert not torch.equal(raw_TK.sort(-1).values.reshape(-1), r.expert_idx_A.view(-1, 2).sort(-1).values.reshape(-1))
    assert r.aux_losses["seq_balance"].item() == pytest.approx(
        1e-4 * sequence_balance_loss(r.probs_TE, torch.arange(30).repeat_interleave(2), raw_TK.reshape(-1), 10,
                                     2).item(), rel=1e-6)
    torch.testing.assert_close(out.loss, out.lm_loss + sum(out.aux_losses.values()))
    # all off: no aux loss at all
    cfg0 = small_config(router=RouterConfig(top_k=2, load_balance_coef=0.0))
    assert build_model(cfg0)(ids, labels=ids).aux_losses == {}


def test_balance_scope_sequence_by_hand():
    """DeepSeek-V2 counts f and P per sequence: two sequences each sending every token to its own
    expert are balanced over the batch (loss 1) but not within a sequence (loss 1.8 by hand)."""
    from moelab.config import RouterConfig
    from moelab.moe.balancing import add_aux_losses, expert_balance_loss, per_sequence
    from moelab.moe.routing import Routing

    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    idx_TK = torch.tensor([[0], [0], [1], [1]])
    routing = Routing.from_topk(idx_TK, torch.ones(4, 1), probs.log(), probs)
    results = {}
    for scope in ("batch", "sequence"):
        cfg = RouterConfig(top_k=1, load_balance_coef=0.0, expert_balance_coef=1.0, balance_scope=scope)
        r = Routing.from_topk(idx_TK, torch.ones(4, 1), probs.log(), probs)
        add_aux_losses(cfg, r, seq_len=2)
        results[scope] = r.aux_losses["expert_balance"].item()
    # batch: f = 2/(1*4) * [2, 2] = [1, 1], P = [0.5, 0.5] -> 1.0
    assert results["batch"] == pytest.approx(1.0)
    # each sequence: f = 2/(1*2) * [2, 0] = [2, 0], P = [0.9, 0.1] -> 1.8; mean over sequences 1.8
    assert results["sequence"] == pytest.approx(1.8)
    # one sequence: the per-sequence loss is the batch loss
    one = per_sequence(lambda p, t, e: expert_balance_loss(p, e, 1), probs, routing.token_idx_A,
                       routing.expert_idx_A, seq_len=4)
    assert one.item() == pytest.approx(expert_balance_loss(probs, routing.expert_idx_A, 1).item())
