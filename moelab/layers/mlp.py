"""Gated FFN (SwiGLU, Shazeer 2020): down(act(x W_gate) * (x W_up))."""

from __future__ import annotations

import torch
from torch import nn

from moelab.layers.norm import activation_fn


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, activation: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, ffn_dim, bias=bias)
        self.up_proj = nn.Linear(d_model, ffn_dim, bias=bias)
        self.down_proj = nn.Linear(ffn_dim, d_model, bias=bias)
        self.act = activation_fn(activation)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x_TD)) * self.up_proj(x_TD))
