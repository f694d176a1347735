"""`moelab experiment routers`: every router trains the same model on the same tokens and steps.

The active parameter budget is held fixed at two expert-widths per token: token-choice routers use
top-2; Switch (top-1) uses experts of twice the width; expert choice uses capacity for 2 experts per
token on average; dynamic top-p keeps its own count (reported). Each variant's balancing losses are
the ones its paper uses (the router family defaults of ``RouterConfig.loss_coefs``, listed in the
report), plus the ST-MoE z-loss 1e-3 for all.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import matplotlib.pyplot as plt

from moelab.config import RouterConfig
from moelab.experiments.common import (
    ExperimentSettings,
    base_config,
    finish,
    prepare_out,
    run_variant,
    shared_data,
    warm_up,
)
from moelab.reports.writer import md_table, save_figure, write_report
from moelab.train import TrainConfig


def _router(cfg: TrainConfig, **kw) -> TrainConfig:
    """The base config with a new router: z-loss 1e-3 everywhere (ST-MoE), every balancing loss at
    the router family's paper default (``RouterConfig.loss_coefs``)."""
    cfg = copy.deepcopy(cfg)
    base = dict(top_k=2, z_loss_coef=1e-3)
    base.update(kw)
    cfg.model.moe.router = RouterConfig(**base)
    cfg.model.moe.__post_init__()  # re-validate the MoE config against the new router
    return cfg


def _switch(cfg: TrainConfig) -> TrainConfig:
    cfg = _router(cfg, type="switch", top_k=1, softmax_order="softmax_then_topk")
    cfg.model.moe = dataclasses.replace(cfg.model.moe, expert_ffn_dim=2 * cfg.model.moe.expert_ffn_dim)
    return cfg


# name -> (description, config transform); the balancing in effect is appended to the description.
ROUTER_VARIANTS: dict[str, tuple[str, Callable[[TrainConfig], TrainConfig]]] = {
    "topk": ("softmax top-2, Mixtral form (Jiang et al. 2024)", lambda c: _router(c, type="topk")),
    "switch": ("Switch top-1, experts 2x wide (Fedus et al. 2021)", _switch),
    "noisy_topk": ("Shazeer noisy top-2 (Shazeer et al. 2017)", lambda c: _router(c, type="noisy_topk")),
    "expert_choice": ("expert choice, capacity = 2 experts/token on average (Zhou et al. 2022)",
                      lambda c: _router(c, type="expert_choice", capacity_factor=1.0)),
    "top_p": ("dynamic top-p, p = 0.4 (Huang et al. 2024)", lambda c: _router(c, type="top_p", top_p=0.4)),
    "deepseek_v2": ("softmax, 4 groups keep 2 by group max (DeepSeek-V2)",
                    lambda c: _router(c, type="deepseek_v2", softmax_order="softmax_then_topk", n_group=4,
                                      topk_group=2)),
    # The V3 paper scores a node by its top K/M affinities; K/M = 2/2 = 1 here, the group max.
    "deepseek_v3": ("sigmoid, 4 groups keep 2 by the sum of the top K/M = 1 scores (DeepSeek-V3 §2.1.2)",
                    lambda c: _router(c, type="deepseek_v3", n_group=4, topk_group=2,
                                      group_score="sum_top_k_over_m")),
}


def run_router_experiment(s: ExperimentSettings) -> dict:
    out = prepare_out(s.out, s.force)
    base = base_config(s)
    data = shared_data(base)
    rows = []
    warm_up(next(iter(ROUTER_VARIANTS.values()))[1](base))  # untimed, so the first variant's tokens/s is fair
    for name, (desc, transform) in ROUTER_VARIANTS.items():
        cfg = transform(base)
        desc = f"{desc}; {cfg.model.moe.router.balancing_summary()}"
        print(f"== router {name}: {desc}")
        row = run_variant(name, cfg, out, data)
        row["description"] = desc
        rows.append(row)
    return finish(out, "routers", s, base, data, rows, _report)


def _f(v, fmt: str = "{:.4f}") -> str:
    """One number format per column in the table (raw floats stay in result.json)."""
    return "n/a" if v is None else fmt.format(v)


def _report(out, result: dict) -> None:
    rows = result["variants"]
    names = [r["name"] for r in rows]
    plots = {}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    # points, not bars: bars must start at 0, which would hide the differences between routers
    ax.plot(names, [r["val_loss"] for r in rows], "o", color="tab:blue", markersize=8)
    ax.set_ylabel("validation loss (nats/token)"), ax.tick_params(axis="x", rotation=30), ax.grid(alpha=0.3)
    ax.set_title("Validation loss by router (last evaluation)")
    plots["val_loss"] = save_figure(fig, out / "plots" / "val_loss_by_router.png")
    for key, label, fname in (("max_load", "max / mean expert load", "max_load_over_training.png"),
                              ("experts_per_token", "experts per token", "experts_per_token.png"),
                              ("dropped_frac", "dropped assignment fraction", "dropped_fraction.png"),
                              ("lm_loss", "train LM loss", "train_loss.png")):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for r in rows:
            pts = [(s, v) for s, v in zip(r["history"]["step"], r["history"][key]) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=r["name"])
        ax.set_xlabel("step"), ax.set_ylabel(label), ax.legend(fontsize=7), ax.grid(alpha=0.3)
        ax.set_title(f"{label[0].upper()}{label[1:]} over training")
        vals = [v for r in rows for v in r["history"][key] if v is not None]
        if key == "dropped_frac" and vals and max(vals) == 0:
            ax.set_ylim(0, 1)  # all zero: a 0..1 axis instead of matplotlib's -0.04..0.04
            ax.text(0.5, 0.5, "no assignment was dropped by any router (all values are 0)",
                    transform=ax.transAxes, ha="center", va="center")
        plots[key] = save_figure(fig, out / "plots" / fname)
    table = md_table(
        ["router", "val loss", "val ppl", "max/mean load (last 20%)", "load CV", "dropped frac", "experts/token",
         "tokens/s", "active params", "total params"],
        [[r["name"], _f(r["val_loss"]), _f(r["val_ppl"], "{:.2f}"), _f(r["max_load_last20"], "{:.2f}"),
          _f(r["load_cv_last20"], "{:.3f}"), _f(r["dropped_frac_last20"], "{:.3f}"),
          _f(r["experts_per_token_last20"], "{:.2f}"), _f(r["median_tokens_per_s"], "{:,.0f}"),
          f"{r['active_params']:,}", f"{r['total_params']:,}"] for r in rows])
    md = [f"# Router comparison ({'quick' if result['quick'] else 'full'}: {result['steps']} steps, seed {result['seed']})",
          "", f"Unigram entropy of the training tokens: {result['unigram_entropy']:.4f} nats.", "", table, "",
          "## Variants", "", md_table(["router", "setting"], [[r["name"], r["description"]] for r in rows]), "",
          "## Plots", ""]
    md += [f"![{k}]({p.relative_to(out)})" for k, p in plots.items()]
    # force: out was checked (new, moelab's, or forced) by prepare_out before the runs
    write_report(out, "moelab router comparison", "\n".join(md) + "\n", result, force=True)
