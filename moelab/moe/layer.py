"""The MoE FFN: router + stacked routed experts + optional always-on shared experts.

y = sum_{e in routed(x)} g_e(x) E_e(x) + [sigmoid(x w_s)] * Shared(x)
(DeepSeekMoE eq. 9-11 shared experts; Qwen2-MoE adds the sigmoid gate on the shared output.)

The layer owns its metrics: after every forward ``last_counts_E`` holds the assignments per expert.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.config import ModelConfig
from moelab.layers.mlp import GatedMLP
from moelab.moe.dispatch import dispatch_combine
from moelab.moe.experts import StackedExperts
from moelab.moe.routing import Routing, build_router


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.num_experts = moe.num_experts
        self.router = build_router(moe.router, cfg.d_model, moe.num_experts)
        self.experts = StackedExperts(moe.num_experts, cfg.d_model, moe.expert_ffn_dim, cfg.activation)
        self.shared = GatedMLP(cfg.d_model, moe.shared_ffn_dim, cfg.activation) if moe.num_shared_experts else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if moe.shared_expert_gate else None
        self.last_counts_E: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        routing = self.router(x_TD)
        out_TD = dispatch_combine(self.experts, x_TD, routing)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        self.last_counts_E = routing.expert_counts().detach()
        return out_TD.view(B, T, D), routing
