"""`moelab experiment capacity`: dropped-token fraction and validation loss versus capacity factor.

The Switch Transformer paper's capacity-factor study (Fedus et al. 2021, §2.2 and Table 1), plus
OpenMoE's drop-towards-the-end view (Xue et al. 2024 §4): the drop rate by position in the sequence.
Capacity = ceil(cf * tokens * k / E), the same factor in training and evaluation; "dropless" is the
reference with no capacity limit.
"""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import torch

from moelab.experiments.common import (
    ExperimentSettings,
    base_config,
    finish,
    prepare_out,
    run_variant,
    shared_data,
)
from moelab.loading import load
from moelab.reports.writer import md_table, save_figure, write_report

FULL_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
QUICK_FACTORS = (0.5, 1.0, 2.0)


@torch.no_grad()
def drop_by_position(model, data, batch_size: int, batches: int) -> list[float]:
    """Mean over MoE layers and validation batches of the dropped fraction at each position."""
    model.eval()
    acc, n = None, 0
    for start in range(0, min(len(data.input_ids), batch_size * batches), batch_size):
        model(data.input_ids[start:start + batch_size])
        for layer in model.moe_layers():
            v = layer.last_metrics["dropped_frac_by_position"].double()
            acc = v if acc is None else acc + v
            n += 1
    return (acc / max(n, 1)).tolist() if acc is not None else []


def run_capacity_experiment(s: ExperimentSettings) -> dict:
    out = prepare_out(s.out, s.force)
    base = base_config(s)
    base.model.moe.router.load_balance_coef = 0.01
    data = shared_data(base)
    factors = QUICK_FACTORS if s.quick else FULL_FACTORS
    rows = []
    for cf in (*factors, None):
        name = "dropless" if cf is None else f"cf_{cf:g}"
        cfg = copy.deepcopy(base)
        cfg.model.moe.router.capacity_factor = cf
        cfg.model.moe.router.eval_capacity_factor = cf
        print(f"== capacity {name}")
        row = run_variant(name, cfg, out, data)
        row["capacity_factor"] = cf
        model = load(out / "runs" / name)
        row["eval_drop_by_position"] = drop_by_position(model, data.val, cfg.batch_size, cfg.eval_batches)
        row["eval_dropped_frac"] = (sum(row["eval_drop_by_position"]) / len(row["eval_drop_by_position"])
                                    if row["eval_drop_by_position"] else 0.0)
        rows.append(row)
    return finish(out, "capacity", s, base, data, rows, _report)


def _report(out, result: dict) -> None:
    rows = result["variants"]
    capped = [r for r in rows if r["capacity_factor"] is not None]
    dropless = next(r for r in rows if r["capacity_factor"] is None)
    cfs = [r["capacity_factor"] for r in capped]
    plots = {}
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(cfs, [r["val_loss"] for r in capped], "o-", color="tab:blue", label="validation loss")
    ax1.axhline(dropless["val_loss"], ls="--", color="tab:blue", alpha=0.6, label="dropless")
    ax1.set_xlabel("capacity factor"), ax1.set_ylabel("validation loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(cfs, [r["dropped_frac_last20"] for r in capped], "s-", color="tab:red", label="train drop fraction")
    ax2.plot(cfs, [r["eval_dropped_frac"] for r in capped], "^:", color="tab:orange", label="eval drop fraction")
    ax2.set_ylabel("dropped assignment fraction", color="tab:red")
    fig.legend(loc="upper right", fontsize=8)
    plots["curve"] = save_figure(fig, out / "plots" / "loss_and_drops_vs_capacity.png")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in capped:
        ax.plot(r["eval_drop_by_position"], label=f"cf {r['capacity_factor']:g}")
    ax.set_xlabel("position in sequence"), ax.set_ylabel("dropped fraction"), ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plots["position"] = save_figure(fig, out / "plots" / "drop_by_position.png")
    table = md_table(["capacity factor", "val loss", "val ppl", "train drop frac (last 20%)", "eval drop frac",
                      "tokens/s"],
                     [["dropless" if r["capacity_factor"] is None else r["capacity_factor"], r["val_loss"],
                       r["val_ppl"], r["dropped_frac_last20"], r["eval_dropped_frac"], r["median_tokens_per_s"]]
                      for r in rows])
    md = [f"# Capacity factor sweep ({'quick' if result['quick'] else 'full'}: {result['steps']} steps, "
          f"seed {result['seed']})", "", table, "", "## Plots", ""]
    md += [f"![{k}]({p.relative_to(out)})" for k, p in plots.items()]
    # force: out was checked (new, moelab's, or forced) by prepare_out before the runs
    write_report(out, "moelab capacity sweep", "\n".join(md) + "\n", result, force=True)
