"""Routing over training (OpenMoE §4, "routing is learned early"): for a run directory, every
checkpoint's top-1 routing on a fixed probe set compared with the final checkpoint's, per MoE layer.

Two measures, each beside its chance level:
- ``agreement[layer][i]``: the fraction of probe tokens whose top-1 expert at checkpoint i equals the
  final checkpoint's (1.0 for the final one);
- ``id_agreement[layer][i]``: OpenMoE's view, per token id: the overlap sum_e min(p_i(e), p_final(e))
  (1 - total variation distance) of the id's top-1 distribution at checkpoint i and at the final
  checkpoint, averaged over the ids seen at least ``id_min_count`` times, weighted by occurrences.
A chance level is the same measure with checkpoint i's top-1 choices permuted over the probe tokens:
same expert load, no link to the token. The probe set is the analysed windows, up to 4096 tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PERMUTATIONS = 20


def id_distributions(top1_N: np.ndarray, inv_N: np.ndarray, num_ids: int, num_experts: int) -> np.ndarray:
    """(ids, E + 1): each token id's distribution over its top-1 experts (ids indexed by ``inv_N``); the
    last column counts tokens with no expert (-1: expert choice, top-p)."""
    table = np.zeros((num_ids, num_experts + 1))
    np.add.at(table, (inv_N, np.where(top1_N < 0, num_experts, top1_N)), 1.0)
    return table / np.maximum(table.sum(axis=1, keepdims=True), 1.0)


def agreement_with_final(top1s: list[np.ndarray], token_N: np.ndarray, num_experts: int, min_count: int = 8,
                         seed: int = 0, permutations: int = PERMUTATIONS) -> dict:
    """Token-level and per-token-id agreement of every checkpoint's top-1 (``top1s``, the final last)
    with the final one's, each with its permutation chance level."""
    final = top1s[-1]
    ids, inv, counts = np.unique(token_N, return_inverse=True, return_counts=True)
    keep = counts >= min_count
    weights = counts[keep] / max(counts[keep].sum(), 1)
    q = id_distributions(final, inv, len(ids), num_experts)[keep]

    def id_overlap(top: np.ndarray) -> float | None:
        if not keep.any():
            return None
        p = id_distributions(top, inv, len(ids), num_experts)[keep]
        return float((np.minimum(p, q).sum(axis=1) * weights).sum())

    rng = np.random.default_rng(seed)
    out = {"agreement": [], "agreement_chance": [], "id_agreement": [], "id_agreement_chance": []}
    for top in top1s:
        shuffled = [rng.permutation(top) for _ in range(permutations)]
        out["agreement"].append(float((top == final).mean()))
        out["agreement_chance"].append(float(np.mean([(s == final).mean() for s in shuffled])))
        out["id_agreement"].append(id_overlap(top))
        out["id_agreement_chance"].append(None if not keep.any() else float(np.mean([id_overlap(s)
                                                                                     for s in shuffled])))
    out["ids"] = int(keep.sum())
    return out


def routing_over_training(source, windows, batch_size: int, layers: list[int], probe_tokens: int = 4096,
                          id_min_count: int = 8, seed: int = 0) -> dict | None:
    """None when ``source`` is not a run directory with at least two checkpoints."""
    from moelab.analysis.recorder import record
    from moelab.checkpoint.model_files import load_model
    from moelab.checkpoint.run import checkpoint_dirs

    ckpts = checkpoint_dirs(Path(source)) if (Path(source) / "checkpoints").is_dir() else []
    if len(ckpts) < 2:
        return None
    probe, n = [], 0
    for w in windows:
        if n >= probe_tokens:
            break
        probe.append(w)
        n += len(w[2])
    top1, token_N, num_experts = [], None, {}
    for c in ckpts:
        model = load_model(c)
        rec, cols = record(model, probe, batch_size, layers, expert_outputs=False, progress=False)
        top1.append({i: rec.traces[i].arrays()["experts"][:, 0].astype(np.int64) for i in layers})
        token_N = cols["token"]
        num_experts = {i: model.blocks[i].ffn.num_experts for i in layers}
    steps = [int(c.name.split("_")[-1]) for c in ckpts]
    per_layer = {str(i): agreement_with_final([t[i] for t in top1], token_N, num_experts[i], id_min_count, seed)
                 for i in layers}
    return {"steps": steps, "probe_tokens": n, "id_min_count": id_min_count,
            **{k: {layer: v[k] for layer, v in per_layer.items()}
               for k in ("agreement", "agreement_chance", "id_agreement", "id_agreement_chance", "ids")}}
