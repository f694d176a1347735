"""Routing statistics of the seed papers, as pure functions of recorded arrays (numpy).

Inputs per MoE layer (see :mod:`moelab.analysis.recorder`): ``experts`` (N, W) choices in order
(-1 = none), ``scores`` (N, E); per token: ``doc`` (document index), ``pos`` (position in its
document), ``token`` (id), ``domain`` (index). Tokens are in document order.

- :func:`expert_load`: Mixtral Fig. 7, the share of all selected (token, expert) choices per expert,
  per domain (every one of a token's K choices counts; each domain's vector sums to 1).
- :func:`consecutive`: Mixtral Table 5, ``first`` = P(top-1 of t+1 = top-1 of t), ``either`` =
  P(the choice sets of t and t+1 share an expert), as pooled ratios of counts over every pair of
  adjacent tokens of one document (never across documents); random baselines 1/E and
  1 - C(E-K, K) / C(E, K).
- :func:`token_specialization`: OpenMoE's context-independent specialisation: the fraction of tokens
  whose top-1 expert is the top-1 most often chosen for their token id.
- :func:`routing_spread`: OpenMoE App. E: the std over experts of the routing distribution, grouped by
  token id vs by position.
- Chance levels (:func:`specialization_with_chance`, :func:`routing_spread`): the same statistic
  with the top-1 choices permuted over the same tokens, which keeps every expert's load and every
  group's size and breaks only the link to the grouping. A uniform-routing baseline would not do: a
  router that ignores token and position but loads its experts unevenly spreads position groups as
  much as its load is uneven, and rare ids reach specialisation 1 by having one occurrence.
- :func:`router_vs_norm`: "A Closer Look" dynamic analysis: whether the top-1 routed expert is the
  expert with the largest output norm, and the (norm rank, score rank) count matrix.

Shape legend: N tokens, W choice columns, E experts.
"""

from __future__ import annotations

from math import comb

import numpy as np


def expert_load(experts_NW: np.ndarray, domain_N: np.ndarray, domains: list[str], num_experts: int) -> dict:
    """{domain: [share of expert e among that domain's selected choices]} (+ "all")."""
    out = {}
    for d, name in [*enumerate(domains), (None, "all")]:
        rows = experts_NW if d is None else experts_NW[domain_N == d]
        picks = rows[rows >= 0].astype(np.int64)
        counts = np.bincount(picks, minlength=num_experts).astype(np.float64)
        if counts.sum() > 0:
            out[name] = (counts / counts.sum()).tolist()
    return out


def adjacent_pairs(doc_N: np.ndarray, pos_N: np.ndarray) -> np.ndarray:
    """Indices i such that tokens i and i+1 are adjacent tokens of the same document."""
    if len(doc_N) < 2:
        return np.zeros(0, dtype=np.int64)
    return np.nonzero((doc_N[1:] == doc_N[:-1]) & (pos_N[1:] == pos_N[:-1] + 1))[0]


def random_baselines(num_experts: int, top_k: int) -> tuple[float, float]:
    """Consecutive-token repetition rates under uniform random routing: 1/E and 1 - C(E-K,K)/C(E,K)."""
    k = min(top_k, num_experts)
    either = 1.0 - (comb(num_experts - k, k) / comb(num_experts, k) if num_experts - k >= k else 0.0)
    return 1.0 / num_experts, either


def _rates(experts_NW: np.ndarray, pairs: np.ndarray) -> dict:
    """Both rates over the same pairs: those where both tokens have an expert (a token with none,
    under expert choice or a capacity, can share nothing; counting it would lower one rate only)."""
    a, b = experts_NW[pairs], experts_NW[pairs + 1]
    valid = (a[:, 0] >= 0) & (b[:, 0] >= 0)
    first = (a[:, 0] == b[:, 0]) & valid
    # either: some expert of t (not padding) appears among t+1's choices
    share = ((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)).any(axis=(1, 2))
    n = int(valid.sum())
    return {"first": float(first.sum() / max(n, 1)), "either": float(share.sum() / max(n, 1)), "pairs": n}


def consecutive(experts_NW: np.ndarray, doc_N: np.ndarray, pos_N: np.ndarray, domain_N: np.ndarray,
                domains: list[str], num_experts: int, top_k: int) -> dict:
    pairs = adjacent_pairs(doc_N, pos_N)
    rf, re_ = random_baselines(num_experts, top_k)
    out = {**_rates(experts_NW, pairs), "random_first": rf, "random_either": re_, "domains": {}}
    for d, name in enumerate(domains):
        mine = pairs[domain_N[pairs] == d]
        if len(mine):
            out["domains"][name] = _rates(experts_NW, mine)
    return out


def token_specialization(top1_N: np.ndarray, token_N: np.ndarray, min_count: int = 1) -> float | None:
    """Fraction of tokens (of ids seen >= ``min_count`` times, with an expert) whose top-1 expert is
    their id's most frequent top-1 expert. 1.0 when routing is a function of the token id."""
    ok = top1_N >= 0
    tok, top = token_N[ok].astype(np.int64), top1_N[ok].astype(np.int64)
    if not len(tok):
        return None
    E = int(top.max()) + 1
    _, inv, counts = np.unique(tok, return_inverse=True, return_counts=True)
    table = np.zeros((len(counts), E), dtype=np.int64)
    np.add.at(table, (inv, top), 1)
    keep = counts >= min_count
    if not keep.any():
        return None
    return float(table.max(axis=1)[keep].sum() / counts[keep].sum())


def _group_std(top1_N: np.ndarray, group_N: np.ndarray, num_experts: int, min_count: int) -> tuple[float, list[int]]:
    _, inv, counts = np.unique(group_N, return_inverse=True, return_counts=True)
    table = np.zeros((len(counts), num_experts))
    np.add.at(table, (inv, top1_N), 1.0)
    keep = counts >= min_count
    if not keep.any():
        return float("nan"), []
    dist = table[keep] / counts[keep, None]
    return float(dist.std(axis=1).mean()), counts[keep].tolist()


PERMUTATIONS = 20  # permutations averaged for a chance level (its spread is reported beside it)
MIN_COUNT = 128  # OpenMoE's minimum occurrences of a token id (or position) for its group to count


def _permuted(stat, top1_N: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """Mean and std of ``stat(permuted top1)`` over ``n`` random permutations of the choices."""
    rng = np.random.default_rng(seed)
    vals = [stat(rng.permutation(top1_N)) for _ in range(n)]
    vals = [v for v in vals if v is not None and v == v]
    return (float(np.mean(vals)), float(np.std(vals))) if vals else (float("nan"), float("nan"))


def specialization_with_chance(top1_N: np.ndarray, token_N: np.ndarray, min_count: int = MIN_COUNT,
                               permutations: int = PERMUTATIONS, seed: int = 0) -> dict:
    """:func:`token_specialization` over the ids seen >= ``min_count`` times, beside its chance level:
    the same over the same tokens with the top-1 choices permuted (same expert load, same ids)."""
    ok = top1_N >= 0
    top, tok = top1_N[ok].astype(np.int64), token_N[ok].astype(np.int64)
    ids, counts = np.unique(tok, return_counts=True)
    frequent = counts >= min_count
    value = token_specialization(top, tok, min_count)
    chance, spread = _permuted(lambda t: token_specialization(t, tok, min_count), top, permutations, seed)
    return {"value": value, "chance": chance if value is not None else None,
            "chance_std": spread if value is not None else None, "min_count": min_count,
            "ids": int(frequent.sum()), "tokens": int(counts[frequent].sum()), "permutations": permutations}


def routing_spread(top1_N: np.ndarray, token_N: np.ndarray, pos_N: np.ndarray, num_experts: int,
                   min_count: int = MIN_COUNT, seed: int = 0, permutations: int = PERMUTATIONS) -> dict:
    """OpenMoE App. E: mean over groups (token ids, resp. positions, seen >= ``min_count`` times)
    of the std over experts of the group's top-1 distribution; ``random_*``: its chance level, the
    same with the top-1 choices permuted over the same tokens (same load, same group sizes)."""
    ok = top1_N >= 0
    top, tok, pos = top1_N[ok].astype(np.int64), token_N[ok], pos_N[ok]
    out = {"min_count": min_count, "permutations": permutations}
    for name, group in (("token", tok), ("position", pos)):
        std, sizes = _group_std(top, group, num_experts, min_count)
        out[f"by_{name}"] = std
        out[f"{name}_groups"] = len(sizes)
        mean, spread = _permuted(lambda t: _group_std(t, group, num_experts, min_count)[0], top, permutations, seed)
        out[f"random_by_{name}"], out[f"random_by_{name}_std"] = mean, spread
    return out


def top_tokens_per_expert(top1_N: np.ndarray, token_N: np.ndarray, num_experts: int, k: int = 10) -> list[list[int]]:
    """Each expert's ``k`` most frequent token ids among the tokens it is the top-1 expert of."""
    out = []
    for e in range(num_experts):
        ids, counts = np.unique(token_N[top1_N == e], return_counts=True)
        out.append(ids[np.argsort(-counts, kind="stable")[:k]].tolist())
    return out


def drop_by_position(dropped_NW: np.ndarray, experts_NW: np.ndarray, pos_N: np.ndarray, max_pos: int) -> list[float]:
    """Dropped fraction of the selected choices at each position 0..max_pos-1 (nan where no token)."""
    sel = experts_NW >= 0
    dropped = (dropped_NW & sel).sum(axis=1)
    chosen = sel.sum(axis=1)
    p = np.clip(pos_N, 0, max_pos - 1)
    d = np.bincount(p, weights=dropped, minlength=max_pos)
    c = np.bincount(p, weights=chosen, minlength=max_pos)
    return [float(x / y) if y else float("nan") for x, y in zip(d, c)]


def rank_matrix(norms_NE: np.ndarray, scores_NE: np.ndarray) -> np.ndarray:
    """(E, E) counts: entry [i, j] = how often the expert with the i-th largest output norm had the
    j-th highest score."""
    N, E = norms_NE.shape
    norm_order = np.argsort(-norms_NE, axis=1, kind="stable")  # expert at norm rank i
    score_rank = np.argsort(np.argsort(-scores_NE, axis=1, kind="stable"), axis=1, kind="stable")
    ranks_of_norm_order = np.take_along_axis(score_rank, norm_order, axis=1)  # (N, E): score rank of norm rank i
    m = np.zeros((E, E), dtype=np.int64)
    for i in range(E):
        m[i] = np.bincount(ranks_of_norm_order[:, i], minlength=E)
    return m


def router_vs_norm(top1_N: np.ndarray, norms_NE: np.ndarray, scores_NE: np.ndarray) -> dict:
    """Both statistics compare the output norms with the router's scores (``scores_NE``, the affinities
    its gates come from): the top-1 is the highest score, so a selection bias (DeepSeek-V3's aux-free
    bias, a balancing device) enters neither. ``top1_N`` marks the tokens with an expert."""
    ok = top1_N >= 0
    frac = float((norms_NE[ok].argmax(axis=1) == scores_NE[ok].argmax(axis=1)).mean()) if ok.any() else None
    m = rank_matrix(norms_NE[ok], scores_NE[ok].astype(np.float32))  # the same tokens as the fraction
    return {"top1_is_max_norm": frac, "random": 1.0 / norms_NE.shape[1], "rank_matrix": m.tolist(),
            "diagonal_frac": float(np.trace(m) / max(m.sum(), 1))}
