"""The Router base class and the registry each router family's file adds itself to.

Shape legend: T tokens, D model dim, H router hidden dim, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.config import RouterConfig
from moelab.moe.routing import Routing


class Router(nn.Module):
    """Base class: a router maps x_TD to a Routing. ``weight`` is the (E, D) gate matrix, or (E, H)
    after an (H, D) ``hidden`` layer when ``cfg.hidden_dim`` is set. ``gate=False`` builds the
    selection rule alone, with no parameters: AoE's experts supply the scores (``route``)."""

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int, gate: bool = True):
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.hidden = None
        if gate and cfg.hidden_dim is not None:
            self.hidden = nn.Parameter(torch.empty(cfg.hidden_dim, d_model))
        width = cfg.hidden_dim if self.hidden is not None else d_model
        self.weight = nn.Parameter(torch.empty(num_experts, width)) if gate else None

    @property
    def active_experts_per_token(self) -> int:
        """Routed experts a token uses (on average), for the active-parameter count."""
        return self.cfg.top_k

    def reset_extra_parameters(self) -> None:
        """Called after the model's generic init: routers whose extra parameters need a specific
        init (Shazeer's W_noise starts at zero) override this."""

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Post-optimizer-step bias update from the load counted since the last call; only routers
        with a selection bias (DeepSeek-V3 aux-loss-free balancing) override this."""

    def check_incremental(self) -> None:
        """Raise if routing in the current mode cannot run one new token at a time with a KV cache
        and give what the full forward gives (a token's routing must not depend on other tokens)."""

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (Switch 'selective precision'), with jitter and temperature."""
        x32 = x_TD.float()
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x32 = x32 * torch.empty_like(x32).uniform_(1.0 - eps, 1.0 + eps)
        if self.hidden is not None:
            x32 = torch.nn.functional.silu(x32 @ self.hidden.float().t())  # (T, H)
        return (x32 @ self.weight.float().t()) / self.cfg.temperature  # (T, E)

    def route(self, logits_TE: torch.Tensor) -> Routing:
        """Select from given fp32 scores (T, E), e.g. AoE's expert norms. Routers whose rule needs
        more than the scores (noise, a bias, sampling) do not implement it."""
        raise NotImplementedError(f"router type {self.cfg.type} cannot select from external scores")

    def forward(self, x_TD: torch.Tensor) -> Routing:
        return self.route(self.logits(x_TD))


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
    def deco(cls: type[Router]) -> type[Router]:
        ROUTERS[name] = cls
        return cls

    return deco
