"""`moelab compare RUN_A RUN_B ...`: one table and shared plots across training runs (loss curves,
per-domain validation, load balance, throughput), written like the run report.

Every number comes from the runs' own ``metrics.jsonl`` and configs: the last training step's LM
loss, the last evaluation's loss / perplexity overall and per domain, the median tokens/s over the
steps after the first (which pays for warm-up), the last step's worst-layer max/mean expert load
and its mean over the last quarter of the steps, and the parameter counts of the config.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from moelab.errors import MoelabError


def _run_summary(run: Path) -> dict:
    from moelab.params import count_params
    from moelab.train.config import RUN_CONFIG, TrainConfig
    from moelab.train.trainer import read_metrics

    records = read_metrics(run)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise MoelabError(f"{run}: metrics.jsonl has no training step; nothing to compare")
    cfg = TrainConfig.load(run / RUN_CONFIG) if (run / RUN_CONFIG).is_file() else None
    count = count_params(cfg.model) if cfg is not None else None
    tps = [r["tokens_per_s"] for r in train[1:]] or [train[0]["tokens_per_s"]]
    tail = train[-max(1, len(train) // 4):]
    loads = [r["max_load"] for r in tail if "max_load" in r]
    last_eval = evals[-1] if evals else {}
    return {
        "run": str(run), "name": run.name, "steps": train[-1]["step"],
        "train_lm_loss": train[-1]["lm_loss"], "val_loss": last_eval.get("val_loss"), "val_ppl": last_eval.get("val_ppl"),
        "val_step": last_eval.get("step"),
        "val_domains": {d: v["ppl"] for d, v in last_eval.get("domains", {}).items()},
        "median_tokens_per_s": statistics.median(tps),
        "max_load_last": train[-1].get("max_load"), "max_load_last_quarter": statistics.mean(loads) if loads else None,
        "total_params": count.total_params if count else None, "active_params": count.active_params if count else None,
        "router": cfg.model.moe.router.type if cfg is not None and cfg.model.moe is not None else None,
        "_train": train, "_evals": evals, "_config": _flatten(cfg.to_dict()) if cfg is not None else {},
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"model": {"moe": {"router": {"top_k": 2}}}}`` -> ``{"model.moe.router.top_k": 2}``."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(summaries: list[dict]) -> list[dict]:
    """The config fields whose values differ between runs (a field missing from a run counts as None)."""
    keys = sorted({k for s in summaries for k in s["_config"]})
    return [{"field": k, "values": {s["name"]: s["_config"].get(k) for s in summaries}} for k in keys
            if len({repr(s["_config"].get(k)) for s in summaries}) > 1]


def compare_runs(runs: list[str | Path], out: str | Path | None, force: bool = False) -> dict:
    """Compare training runs; with ``out``, write the report there (a new or moelab-written directory,
    or with ``force`` any directory: nothing in it is deleted)."""
    if len(runs) < 2:
        raise MoelabError("compare needs at least two run directories")
    paths = [Path(r) for r in runs]
    for p in paths:
        if not (p / "metrics.jsonl").is_file():
            raise MoelabError(f"{p}: no metrics.jsonl; not a moelab run directory")
    summaries = [_run_summary(p) for p in paths]
    names = [s["name"] for s in summaries]
    if len(set(names)) < len(names):  # same basename: use the paths
        for s in summaries:
            s["name"] = s["run"]
    result = {"runs": [{k: v for k, v in s.items() if not k.startswith("_")} for s in summaries],
              "config_differences": config_differences(summaries)}
    steps = sorted({s["steps"] for s in summaries})
    if len(steps) > 1:
        result["steps_note"] = (f"the runs trained for different numbers of steps ({', '.join(map(str, steps))}): "
                                "their last-step numbers are not at the same point of training")
    if out is not None:
        _write(Path(out), summaries, result, force)
    return result


def _write(out: Path, summaries: list[dict], result: dict, force: bool = False) -> None:
    import matplotlib

    from moelab.checkpoint.atomic import prepare_output_dir

    prepare_output_dir(out, force=force)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moelab.fileio import write_atomic
    from moelab.reports.writer import md_table, save_figure, write_report

    import json

    plots = {}
    fig, ax = plt.subplots(figsize=(8, 4))
    for s in summaries:
        line, = ax.plot([r["step"] for r in s["_train"]], [r["lm_loss"] for r in s["_train"]], alpha=0.6,
                        label=f"{s['name']} train")
        if s["_evals"]:
            ax.plot([e["step"] for e in s["_evals"]], [e["val_loss"] for e in s["_evals"]], "o--",
                    color=line.get_color(), label=f"{s['name']} validation")
    ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    plots["loss"] = save_figure(fig, out / "plots" / "loss.png")

    domains = sorted({d for s in summaries for d in s["val_domains"]})
    if domains:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.8 / len(summaries)
        for i, s in enumerate(summaries):
            ax.bar([j + i * width for j in range(len(domains))], [s["val_domains"].get(d, float("nan")) for d in domains],
                   width=width, label=s["name"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
        ax.set_ylabel("validation perplexity (last eval)"), ax.legend(fontsize=8), ax.grid(alpha=0.3, axis="y")
        plots["domains"] = save_figure(fig, out / "plots" / "val_ppl_by_domain.png")

    if any("max_load" in r for s in summaries for r in s["_train"]):
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for s in summaries:
            pts = [(r["step"], r["max_load"]) for r in s["_train"] if "max_load" in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=s["name"])
        ax.axhline(1.0, ls="--", color="gray", lw=1)
        ax.set_xlabel("step"), ax.set_ylabel("max / mean expert load (worst layer)"), ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        plots["load"] = save_figure(fig, out / "plots" / "load_balance.png")

    fig, ax = plt.subplots(figsize=(8, 3))
    for s in summaries:
        ax.plot([r["step"] for r in s["_train"]], [r["tokens_per_s"] for r in s["_train"]], label=s["name"])
    ax.set_xlabel("step"), ax.set_ylabel("tokens / s"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    plots["throughput"] = save_figure(fig, out / "plots" / "tokens_per_s.png")

    def f(v, fmt="{:.4f}"):
        return "n/a" if v is None else fmt.format(v)

    rows = [[s["name"], s["router"] or "dense", f(s["total_params"], "{:,}"), f(s["active_params"], "{:,}"), s["steps"],
             f(s["train_lm_loss"]), f(s["val_loss"]), f(s["val_ppl"], "{:.2f}"), f(s["median_tokens_per_s"], "{:,.0f}"),
             f(s["max_load_last"], "{:.2f}"), f(s["max_load_last_quarter"], "{:.2f}")] for s in summaries]
    md = ["# moelab compare", "",
          md_table(["run", "router", "params", "active", "steps", "train LM loss", "val loss", "val ppl",
                    "median tokens/s", "max/mean load (last)", "max/mean load (last quarter)"], rows), ""]
    if result.get("steps_note"):
        md += [f"**Note:** {result['steps_note']}.", ""]
    diffs = result["config_differences"]
    md += ["## Config differences", ""]
    if diffs:
        md += [md_table(["field", *[s["name"] for s in summaries]],
                        [[d["field"], *[str(d["values"][s["name"]]) for s in summaries]] for d in diffs]), ""]
    else:
        md += ["The runs' configs are identical (or no run has a saved config).", ""]
    if domains:
        md += ["## Validation perplexity by domain (last evaluation)", "",
               md_table(["run", *domains], [[s["name"], *[f(s["val_domains"].get(d), "{:.2f}") for d in domains]]
                                            for s in summaries]), ""]
    titles = {"loss": "Loss curves", "domains": "Validation perplexity by domain", "load": "Load balance",
              "throughput": "Throughput"}
    md += ["## Plots", ""] + [x for k, p in plots.items() for x in (f"### {titles[k]}", "",
                                                                   f"![{titles[k]}]({p.relative_to(out)})", "")]
    write_report(out, "moelab compare", "\n".join(md), result, force=force)
    write_atomic(out / "result.json", json.dumps(result, indent=1) + "\n")
