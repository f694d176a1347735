"""Load-balance metrics from expert counts (REFERENCES §11); pure functions, no state.

Load c_i = assignments routed to expert i in a window (a forward, a step, a validation set),
counting all K slots; ideal load c_bar = mean_i c_i (= T*K/E for top-k).

Shape legend: E experts.
"""

from __future__ import annotations

import torch


def load_balance_metrics(counts_E: torch.Tensor) -> dict[str, float]:
    """max_load_ratio = max c / c_bar (torchtitan / OLMo-core "load imbalance"),
    max_vio = (max c - c_bar) / c_bar (Wang et al. 2024 "Loss-Free Balancing" eq. 4),
    cv = std c / c_bar (population std), dead_expert_frac = share of experts with c = 0."""
    c = counts_E.detach().float()
    mean = c.mean().clamp_min(1e-12)
    ratio, cv, dead = torch.stack([c.max() / mean, c.std(unbiased=False) / mean, (c == 0).float().mean()]).tolist()
    return {"max_load_ratio": ratio, "max_vio": ratio - 1.0, "cv": cv, "dead_expert_frac": dead}
