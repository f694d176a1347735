"""Experiments: one file per `moelab experiment <name>` command, composing train + eval + report."""

from moelab.experiments.aoe import run_aoe_ablation, run_aoe_strategies
from moelab.experiments.capacity import run_capacity_experiment
from moelab.experiments.routers import ROUTER_VARIANTS, run_router_experiment

# Experiments that train their variants; `routerless` (moelab.experiments.routerless) studies a given model.
EXPERIMENTS = {"routers": run_router_experiment, "capacity": run_capacity_experiment,
               "aoe-ablation": run_aoe_ablation, "aoe-strategies": run_aoe_strategies}

__all__ = ["EXPERIMENTS", "ROUTER_VARIANTS", "run_aoe_ablation", "run_aoe_strategies", "run_capacity_experiment",
           "run_router_experiment"]
