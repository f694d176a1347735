"""One file per router family; importing this package registers them all in ``ROUTERS``."""

from moelab.config import RouterConfig
from moelab.moe.routers import deepseek, expert_choice, noisy_topk, sparsemixer, top_p, topk  # noqa: F401
from moelab.moe.routers.base import ROUTERS, Router, register_router

__all__ = ["ROUTERS", "Router", "build_router", "register_router"]


def build_router(cfg: RouterConfig, d_model: int, num_experts: int, gate: bool = True) -> Router:
    return ROUTERS[cfg.type](cfg, d_model, num_experts, gate=gate)
