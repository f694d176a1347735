"""Total and active parameter counts of a config, by building the model on the meta device.

Active parameters per token (the convention behind Mixtral's 46.7B total / 12.9B active): every
non-expert parameter (embeddings and LM head included, a tied head counted once), the full router,
all shared experts, and the routed experts a token uses (K of E) in each MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moelab.config import ModelConfig
from moelab.layers.mlp import GatedMLP
from moelab.model import MoETransformer, build_model
from moelab.moe.aoe import AoEExperts
from moelab.moe.experts import StackedExperts
from moelab.moe.layer import MoELayer
from moelab.moe.routers import Router

COMPONENTS = ("embeddings", "attention", "dense_ffn", "experts", "shared_experts", "routers", "norms", "lm_head")
# DeepSeek-V3's multi-token-prediction modules: counted apart (``ParamCount.mtp_params``), outside the
# totals, as the V3 paper's 671B / 37B leave them out (its HF checkpoint's 685B includes them)
MTP = "mtp"


@dataclass
class ParamCount:
    total_params: int
    active_params: int
    breakdown: dict[str, int] = field(default_factory=dict)  # total per component
    active_breakdown: dict[str, int] = field(default_factory=dict)
    # The count many papers publish (the AoE paper's 247M): a tied embedding counted again as the
    # output head, and only the K chosen experts (AoE's other W_down, which every token runs, left out).
    active_params_paper: int = 0
    # Per token, per forward: bytes of activations AoE computes for every expert (T x E x d_low) at
    # the parameters' dtype, summed over layers; 0 without AoE.
    aoe_cache_bytes_per_token: int = 0
    # MTP modules' own parameters (the embedding and output head they share are not counted again),
    # and of those the ones a token uses (its routed experts K of E); not in the totals above
    mtp_params: int = 0
    mtp_active_params: int = 0

    def to_dict(self) -> dict:
        return {"total_params": self.total_params, "active_params": self.active_params,
                "active_params_paper": self.active_params_paper,
                "aoe_cache_bytes_per_token": self.aoe_cache_bytes_per_token,
                "mtp_params": self.mtp_params, "mtp_active_params": self.mtp_active_params,
                "breakdown": self.breakdown, "active_breakdown": self.active_breakdown}


def _component(model: MoETransformer, module_name: str, module: nn.Module) -> str:
    if module is model.embed:
        return "embeddings"
    if module is model.lm_head:
        return "lm_head"
    if isinstance(module, (nn.LayerNorm,)) or type(module).__name__ == "RMSNorm":
        return "norms"
    if isinstance(module, Router):
        return "routers"
    if isinstance(module, (StackedExperts, AoEExperts)):
        return "experts"
    parts = module_name.split(".")
    if "attn" in parts:
        return "attention"
    if "shared" in parts or "shared_gate" in parts:
        return "shared_experts"
    if isinstance(module, (GatedMLP, nn.Linear)):
        return "dense_ffn"
    raise AssertionError(f"unclassified module {module_name}")  # a new module type needs a component


def count_model(model: MoETransformer) -> ParamCount:
    """Count a built model (meta or real). Shared (tied) tensors are counted once."""
    seen: set[int] = set()
    total = {c: 0 for c in COMPONENTS}
    mtp_total = mtp_inactive = 0
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.split(".")[0] == MTP:
                mtp_total += p.numel()
            else:
                total[_component(model, name, module)] += p.numel()
    if model.mtp is not None:
        for layer in model.mtp.modules():
            if isinstance(layer, MoELayer):
                mtp_inactive += sum(p.numel() for p in layer.experts.parameters()) - int(layer.active_expert_params())
    active = dict(total)
    paper_gap, cache_bytes = 0, 0
    for layer in (b.ffn for b in model.blocks):
        if isinstance(layer, MoELayer):
            active["experts"] -= sum(p.numel() for p in layer.experts.parameters()) - int(layer.active_expert_params())
            if isinstance(layer.experts, AoEExperts):
                x = layer.experts
                if layer.router_free:
                    paper_gap += (x.num_experts - layer.router.active_experts_per_token) * x.d_model * x.d_low
                    cache_bytes += x.num_experts * x.d_low * x.wdown_ELD.element_size()
    active_total = sum(active.values())
    tied_again = model.embed.weight.numel() if model.lm_head.weight is model.embed.weight else 0
    return ParamCount(sum(total.values()), active_total, total, active,
                      active_params_paper=active_total + tied_again - paper_gap,
                      aoe_cache_bytes_per_token=cache_bytes, mtp_params=mtp_total,
                      mtp_active_params=mtp_total - mtp_inactive)


def count_params(cfg: ModelConfig) -> ParamCount:
    """Count the parameters of ``cfg`` without allocating memory (meta device)."""
    return count_model(build_model(cfg, device="meta"))


def human(n: float) -> str:
    """46702792704 -> '46.7B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))
