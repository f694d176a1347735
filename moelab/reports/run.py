"""The run report: ``write_run_report(run_dir)`` reads ``metrics.jsonl`` and ``config.yaml`` of a
training run and writes ``report.md``, ``report.html``, ``report.json`` (every number shown) and
``plots/*.png``."""

from __future__ import annotations

from pathlib import Path

from moelab.errors import MoelabError
from moelab.reports.writer import md_table, plt, save_figure, write_report


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_plots(train: list[dict], evals: list[dict], plot_dir: Path, unigram_entropy: float | None = None
              ) -> dict[str, Path]:
    plots = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(train, "lm_loss"), label="train LM loss", alpha=0.7)
    depths = max((len(r.get("mtp_loss", [])) for r in train), default=0)
    for k in range(depths):  # DeepSeek-V3 MTP: the loss of predicting token i + k + 2, unweighted
        pts = [(r["step"], r["mtp_loss"][k]) for r in train if len(r.get("mtp_loss", [])) > k]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], alpha=0.7, label=f"train MTP loss, depth {k + 1}")
    if evals:
        ax.plot(*_series(evals, "val_loss"), "o-", label="validation loss")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, ls="--", color="gray", label="unigram entropy of the corpus")
    ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.legend(), ax.grid(alpha=0.3)
    plots["loss"] = save_figure(fig, plot_dir / "loss.png")

    if evals and evals[-1].get("domains"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for dom in evals[-1]["domains"]:
            steps = [e["step"] for e in evals if dom in e.get("domains", {})]
            ax.plot(steps, [e["domains"][dom]["ppl"] for e in evals if dom in e.get("domains", {})], "o-", label=dom)
        ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("validation perplexity")
        ax.legend(), ax.grid(alpha=0.3)
        plots["domain_ppl"] = save_figure(fig, plot_dir / "val_ppl_by_domain.png")

    loads = [r for r in train if r.get("load")]
    if loads:
        n_layers = len(loads[0]["load"])
        fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.8 * n_layers + 0.8), squeeze=False)
        steps = [r["step"] for r in loads]
        for li in range(n_layers):
            mat = [[r["load"][li][e] for r in loads] for e in range(len(loads[0]["load"][li]))]  # (E, steps)
            im = axes[li, 0].imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest",
                                    extent=[steps[0], steps[-1], len(mat) - 0.5, -0.5])
            axes[li, 0].set_ylabel(f"MoE layer {li}\nexpert")
            fig.colorbar(im, ax=axes[li, 0], label="load fraction")
        axes[-1, 0].set_xlabel("step")
        plots["expert_load"] = save_figure(fig, plot_dir / "expert_load.png")

    aux_names = sorted({k for r in train for k in r.get("aux", {})})
    if aux_names:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name in aux_names:
            ax.plot([r["step"] for r in train if name in r["aux"]], [r["aux"][name] for r in train if name in r["aux"]],
                    label=name)
        ax.set_xlabel("step"), ax.set_ylabel("weighted aux loss"), ax.legend(), ax.grid(alpha=0.3)
        plots["aux"] = save_figure(fig, plot_dir / "aux_losses.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*_series(train, "tokens_per_s"))
    ax.set_xlabel("step"), ax.set_ylabel("tokens / s"), ax.grid(alpha=0.3)
    plots["throughput"] = save_figure(fig, plot_dir / "tokens_per_s.png")

    par = [r for r in train if r.get("parallel")]
    if par and any(r["parallel"]["ep"] > 1 for r in par):  # expert parallelism: per-rank load and all-to-all
        world = par[0]["parallel"]["world"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [r["step"] for r in par]
        for rank in range(world):
            ax2.plot(steps, [r["parallel"]["a2a_frac"][rank] for r in par], label=f"rank {rank}")
        for rank in range(par[0]["parallel"]["ep"]):
            ax1.plot(steps, [r["parallel"].get("expert_load", [0] * world)[rank] for r in par], label=f"ep rank {rank}")
        ax1.set_xlabel("step"), ax1.set_ylabel("share of assignments computed"), ax1.legend(), ax1.grid(alpha=0.3)
        ax2.set_xlabel("step"), ax2.set_ylabel("all-to-all share of the step"), ax2.legend(), ax2.grid(alpha=0.3)
        plots["parallel"] = save_figure(fig, plot_dir / "parallel.png")
    return plots


def write_run_report(run_dir: str | Path) -> dict[str, Path]:
    from moelab.train.trainer import RUN_CONFIG, read_metrics

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    meta = next((r for r in records if r.get("kind") == "meta"), {})
    if not train:
        raise MoelabError(f"{run_dir}: metrics.jsonl has no training step yet; nothing to report")
    cfg_text = (run_dir / RUN_CONFIG).read_text() if (run_dir / RUN_CONFIG).is_file() else ""
    plots = run_plots(train, evals, run_dir / "plots", meta.get("unigram_entropy"))

    last, last_eval = train[-1], (evals[-1] if evals else {})
    tps = sorted(r["tokens_per_s"] for r in train)
    result = {
        "final_step": last["step"], "final_train_lm_loss": last["lm_loss"], "final_train_loss": last["loss"],
        "final_aux_losses": last.get("aux", {}), "unigram_entropy": meta.get("unigram_entropy"),
        "val_loss": last_eval.get("val_loss"), "val_ppl": last_eval.get("val_ppl"),
        "val_domains": last_eval.get("domains", {}), "median_tokens_per_s": tps[len(tps) // 2],
        "final_load": last.get("load"), "final_max_load": last.get("max_load"),
        "eval_history": [{"step": e["step"], "val_loss": e["val_loss"]} for e in evals],
    }
    md = [f"# moelab run report: {run_dir.name}", ""]
    rows = [["final step", last["step"]], ["train LM loss (last step)", last["lm_loss"]],
            ["validation loss", last_eval.get("val_loss", float("nan"))],
            ["validation perplexity", last_eval.get("val_ppl", float("nan"))],
            ["unigram entropy of the training tokens (nats)", meta.get("unigram_entropy", float("nan"))],
            ["median tokens/s", result["median_tokens_per_s"]],
            ["max/mean expert load (last step, worst layer)", last.get("max_load", float("nan"))]]
    rows += [[f"aux loss {k} (last step)", v] for k, v in last.get("aux", {}).items()]
    md += ["## Final numbers", "", md_table(["metric", "value"], rows), ""]
    if result["val_domains"]:
        md += ["## Validation by domain", "",
               md_table(["domain", "loss", "perplexity", "tokens"],
                        [[d, v["loss"], v["ppl"], v["tokens"]] for d, v in result["val_domains"].items()]), ""]
    if evals:
        md += ["## Validation over training", "",
               md_table(["step", "val loss", "val ppl"], [[e["step"], e["val_loss"], e["val_ppl"]] for e in evals]), ""]
    if last.get("load"):
        E = len(last["load"][0])
        md += ["## Expert load at the last step (fraction of assignments)", "",
               md_table(["MoE layer"] + [f"e{i}" for i in range(E)],
                        [[i] + row for i, row in enumerate(last["load"])]), ""]
    if last.get("parallel"):
        p = last["parallel"]
        result["parallel"] = p
        md += [f"## Processes at the last step ({p['world']} ranks, mesh dp={p['dp']} x ep={p['ep']})", "",
               md_table(["rank", "token rows sent to other ranks' experts", "rows its experts received",
                         "all-to-all s", "all-to-all share"],
                        [[r, p["rows_sent"][r], p["rows_received"][r], p["a2a_s"][r], p["a2a_frac"][r]]
                         for r in range(p["world"])]), ""]
        if p.get("expert_load"):
            md += ["Share of the routed assignments computed by each expert-parallel rank: "
                   + ", ".join(f"rank {r} {v:.3f}" for r, v in enumerate(p["expert_load"])) + ".", ""]
    titles = {"loss": "Loss", "domain_ppl": "Validation perplexity by domain", "expert_load": "Expert load over training",
              "aux": "Aux losses", "throughput": "Throughput", "parallel": "Expert parallelism per rank"}
    md += ["## Plots", ""]
    for key, path in plots.items():
        md += [f"### {titles[key]}", "", f"![{titles[key]}]({path.relative_to(run_dir)})", ""]
    md += ["## Resolved config", "", "```yaml", cfg_text.rstrip(), "```", ""]
    # force: a run directory is moelab's, marked or not (runs from before .moelab)
    paths = write_report(run_dir, f"moelab run {run_dir.name}", "\n".join(md), result, force=True)
    return {**paths, **{f"plot_{k}": v for k, v in plots.items()}}
