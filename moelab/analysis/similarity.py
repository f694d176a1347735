"""Expert similarity ("A Closer Look into Mixture-of-Experts in Large Language Models", Lo et al.
2024, arXiv 2406.18219, static and dynamic analyses; code kamanphoebe/Look-into-MoEs).

- Matrix level: cosine similarity of the flattened gate, up and down matrices of every pair of
  experts of a layer (E x E each). A scaled copy of an expert has similarity 1.
- Output level: the mean over tokens of the similarity of two experts' outputs on the same token
  (accumulated by the recorder): by default the angular similarity 1 - arccos(cos)/pi that the
  authors' heat maps average (orthogonal outputs = 0.5, opposite = 0), or the plain cosine
  (orthogonal = 0) with ``output_similarity="cosine"``.
- Weight vs output: the Pearson correlation (and R^2) over expert pairs between weight similarity
  and output similarity, per matrix kind.
- Router vs experts: the paper's gate-embedding analysis. The cosine of router rows (E x E) is
  regressed on the neuron-averaged expert similarity (w1/w3 averaged over their F rows, w2 over its
  F columns: one D-vector per expert) over the lower-triangle pairs; R^2 per matrix kind.
- Neuron matching (optional, costly): per pair and per matrix (as the paper: one matching per
  matrix), match the F neurons by the Hungarian algorithm on their cosine (scipy
  ``linear_sum_assignment``, maximised) and report the similarity after reordering; also Kendall's
  tau of each matching against the identity.

For AoE experts the gate matrix is the product W_up W_down (d_wide x D), up is W_p, down is W_o.

Shape legend: E experts, F expert FFN dim, D model dim.
"""

from __future__ import annotations

import numpy as np
import torch

from moelab.moe.aoe import AoEExperts
from moelab.moe.layer import MoELayer

KINDS = ("gate", "up", "down")
OUTPUT_SIMILARITIES = ("angular", "cosine")


def output_similarity_sums(y_TED: torch.Tensor) -> dict[str, np.ndarray]:
    """Per measure (angular, cosine), the E x E sum over tokens of the similarity of every pair of
    expert outputs on the same token (divide by T for the mean)."""
    y_TED = y_TED.double()  # arccos is steep near 1: in fp32 a self-similarity would read 0.9999
    unit_TED = y_TED / y_TED.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos_TEE = torch.einsum("ted,tfd->tef", unit_TED, unit_TED).clamp(-1, 1)
    return {"cosine": cos_TEE.sum(0).cpu().numpy(),
            "angular": (1 - torch.arccos(cos_TEE) / torch.pi).sum(0).cpu().numpy()}


@torch.no_grad()
def expert_matrices(layer: MoELayer) -> dict[str, torch.Tensor]:
    """gate/up as (E, F, D), down as (E, D, F), fp32."""
    ex = layer.experts
    if isinstance(ex, AoEExperts):
        return {"gate": (ex.wup_EWL @ ex.wdown_ELD).float(), "up": ex.wp_EWD.float(), "down": ex.wo_EDW.float()}
    return {"gate": ex.gate_EFD.float(), "up": ex.up_EFD.float(), "down": ex.down_EDF.float()}


def cosine_matrix(v_EX: torch.Tensor) -> np.ndarray:
    u = v_EX / v_EX.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (u @ u.t()).clamp(-1, 1).detach().double().cpu().numpy()


def weight_similarity(layer: MoELayer) -> dict[str, list[list[float]]]:
    return {k: cosine_matrix(m.reshape(m.shape[0], -1)).tolist() for k, m in expert_matrices(layer).items()}


def neuron_averaged(layer: MoELayer) -> dict[str, np.ndarray]:
    """Per kind, the cosine of the neuron-averaged expert vectors (gate/up over F rows, down over F columns)."""
    m = expert_matrices(layer)
    return {"gate": cosine_matrix(m["gate"].mean(dim=1)), "up": cosine_matrix(m["up"].mean(dim=1)),
            "down": cosine_matrix(m["down"].mean(dim=2))}


def _lower(m: np.ndarray) -> np.ndarray:
    i, j = np.tril_indices(m.shape[0], k=-1)
    return np.asarray(m)[i, j]


def pair_correlation(x_EE, y_EE) -> dict:
    """Pearson r and R^2 of a linear fit of y on x over the lower-triangle expert pairs."""
    x, y = _lower(np.asarray(x_EE)), _lower(np.asarray(y_EE))
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return {"r": None, "r2": None, "pairs": int(len(x))}
    r = float(np.corrcoef(x, y)[0, 1])
    return {"r": r, "r2": r * r, "pairs": int(len(x))}


@torch.no_grad()
def router_rows_similarity(layer: MoELayer) -> np.ndarray | None:
    """Cosine of the router's rows (E x E); None without a router (AoE) or with an MLP router."""
    w = getattr(layer.router, "weight", None)
    if w is None or getattr(layer.router, "hidden", None) is not None:
        return None
    return cosine_matrix(w.float())


def router_vs_experts(layer: MoELayer) -> dict | None:
    rows = router_rows_similarity(layer)
    if rows is None:
        return None
    return {k: pair_correlation(v, rows) for k, v in neuron_averaged(layer).items()}


@torch.no_grad()
def neuron_matched_similarity(layer: MoELayer) -> dict:
    """Per kind, E x E similarity after matching the neurons of each pair of experts, matrix by matrix
    as the paper does: the F x F cosine of one matrix's neurons (gate / up rows, down columns), its
    Hungarian matching, the flattened cosine after reordering; plus Kendall's tau of each matching
    against the identity (``kendall_tau[kind]``, E x E)."""
    try:
        from scipy.optimize import linear_sum_assignment
        from scipy.stats import kendalltau
    except ImportError as e:  # pragma: no cover - scipy is a dependency
        raise ImportError("neuron matching needs scipy: pip install scipy") from e
    m = expert_matrices(layer)
    neurons = {"gate": m["gate"], "up": m["up"], "down": m["down"].transpose(1, 2)}  # (E, F, X) each
    E = m["gate"].shape[0]
    out, tau = {}, {}
    for k in KINDS:
        n_EFX = neurons[k]
        unit_EFX = n_EFX / n_EFX.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim, t = np.eye(E), np.eye(E)
        for a in range(E):
            for b in range(a):
                cost_FF = (unit_EFX[a] @ unit_EFX[b].t()).double().cpu().numpy()  # neuron cosines
                _, perm = linear_sum_assignment(cost_FF, maximize=True)
                vb = n_EFX[b][torch.as_tensor(perm)]
                sim[a, b] = sim[b, a] = float(torch.nn.functional.cosine_similarity(
                    n_EFX[a].reshape(1, -1), vb.reshape(1, -1)))
                t[a, b] = t[b, a] = float(kendalltau(np.arange(len(perm)), perm).statistic)
        out[k], tau[k] = sim.tolist(), t.tolist()
    return {**out, "kendall_tau": tau}
