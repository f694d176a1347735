"""Experiments: one file per `moelab experiment <name>` command, composing train + eval + report."""

from moelab.experiments.capacity import run_capacity_experiment
from moelab.experiments.routers import ROUTER_VARIANTS, run_router_experiment

EXPERIMENTS = {"routers": run_router_experiment, "capacity": run_capacity_experiment}

__all__ = ["EXPERIMENTS", "ROUTER_VARIANTS", "run_capacity_experiment", "run_router_experiment"]
