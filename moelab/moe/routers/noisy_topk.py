"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", §2.1, Appendix A).

H(x)_i = (x W_g)_i + N(0, 1) * (softplus((x W_noise)_i) + eps)   (noise only in training;
                                                             eps = ``noise_epsilon``, 1e-2)
G(x)   = softmax(KeepTopK(H(x), k))                          (softmax over the k survivors)

W_noise is trainable and starts at zero (softplus(0) = ln 2, so the initial noise std is 0.69 + eps);
W_g keeps the model's normal init (the paper zeroes it too; with a zero W_g every token would tie).
The smooth load loss needs the clean logits, the noisy ones and the noise std, so the router adds
it itself (``noisy_load``); the importance loss CV(sum_x G(x))^2 is generic and added by the layer.

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import RouterConfig
from moelab.moe.balancing import noisy_load_loss
from moelab.moe.routers.base import Router, register_router
from moelab.moe.routing import Routing


@register_router("noisy_topk")
class NoisyTopKRouter(Router):
    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int, gate: bool = True):
        super().__init__(cfg, d_model, num_experts, gate=gate)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))  # W_noise^T, (E, D)

    @torch.no_grad()
    def reset_extra_parameters(self) -> None:
        nn.init.zeros_(self.noise_weight)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        K = self.cfg.top_k
        clean_TE = self.logits(x_TD)  # (T, E) fp32
        # softplus + noise_epsilon (tensor2tensor): softplus underflows to 0 for very negative inputs,
        # and a zero std makes the load loss's Phi((clean - threshold) / std) NaN in backward.
        noise_std_TE = F.softplus(x_TD.float() @ self.noise_weight.float().t()) + self.cfg.noise_epsilon  # (T, E)
        if self.training:
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
        else:
            noisy_TE = clean_TE
        top_TK, topk_idx_TK = noisy_TE.topk(K, dim=-1)
        weight_TK = top_TK.softmax(dim=-1)  # KeepTopK then softmax
        routing = Routing.from_topk(topk_idx_TK, weight_TK, clean_TE, clean_TE.softmax(dim=-1))
        coef = self.cfg.loss_coefs()["noisy_load"]
        if coef > 0:
            routing.aux_losses["noisy_load"] = coef * noisy_load_loss(
                clean_TE, noisy_TE, noise_std_TE, K)
        return routing
