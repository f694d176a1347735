"""Rotary position embedding (Su et al. 2021), half-split layout as in Llama/Mixtral/HF.

Shape legend: B batch, H heads, T query positions, Dh head dim.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions_T: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, Dh) for integer positions, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions_T.device) / head_dim))
    freqs_TH = positions_T.float()[:, None] * inv_freq[None, :]  # (T, Dh/2)
    emb_TD = torch.cat([freqs_TH, freqs_TH], dim=-1)  # (T, Dh)
    return emb_TD.cos(), emb_TD.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate q or k; math in fp32, result in the input dtype."""
    x32 = x_BHTD.float()
    out = x32 * cos_TD + _rotate_half(x32) * sin_TD
    return out.to(x_BHTD.dtype)
