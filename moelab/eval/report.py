"""Figures and reports of `moelab eval`: the passkey heatmap, the perplexity-vs-context curve,
perplexity by domain and multiple-choice accuracy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from moelab.checkpoint.atomic import prepare_output_dir  # noqa: E402
from moelab.reports.writer import md_table, save_figure, write_report  # noqa: E402


def _write(out: Path, title: str, md: list[str], result: dict) -> None:
    write_report(out, title, "\n".join(md) + "\n", result, json_name="result.json")


# ---- passkey ------------------------------------------------------------------------------------
def passkey_heatmap(grid: dict, path: Path, title: str) -> Path:
    """Accuracy with depth on the y axis (0 = start of the context) and length on the x axis."""
    lengths, depths, acc = grid["lengths"], grid["depths"], grid["accuracy"]  # acc[depth][length]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.55 * len(depths)))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{acc[i][j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)"), ax.set_ylabel("depth of the key"), ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    return save_figure(fig, path)


def _grid_table(grid: dict) -> str:
    headers = ["depth \\ length", *[str(n) for n in grid["lengths"]], "all"]
    rows = [[f"{d:g}", *row, grid["by_depth"][i]] for i, (d, row) in enumerate(zip(grid["depths"], grid["accuracy"]))]
    rows.append(["all", *grid["by_length"], grid["overall"]])
    return md_table(headers, rows)


def write_passkey_report(out: Path, result: dict) -> None:
    """report.md / .html, result.json and plots/passkey_heatmap.png (plus the untrained baseline's for --quick)."""
    prepare_output_dir(out)  # new or moelab's (or --force: moelab.checkpoint.atomic.forced_outputs)
    md = ["# Passkey retrieval", "",
          f"Source: `{result['source']}`. {result['trials']} trials per cell, keys of {result['digits']} digits, "
          f"greedy decoding of {result['new_tokens']} tokens; a trial is right when the first digit run of the "
          "continuation is exactly the key (Mohtashami & Jaggi 2023; Mixtral §3).", ""]
    figs = {"trained": passkey_heatmap(result["grid"], out / "plots" / "passkey_heatmap.png",
                                       f"passkey retrieval: {result['source']}")}
    md += ["![passkey accuracy by length and depth](plots/passkey_heatmap.png)", "", _grid_table(result["grid"]), ""]
    if "untrained" in result:
        q = result["quick"]
        md += ["## --quick: the same model before and after training on the task", "",
               f"A {q['params']:,}-parameter moelab model (d_model {q['config']['d_model']}, "
               f"{q['config']['num_layers']} layers, {q['config']['moe']['num_experts']} experts top-"
               f"{q['config']['moe']['router']['top_k']}) trained {q['steps']} steps of {q['batch_size']} prompts "
               f"of {q['train_lengths'][0]}-{q['train_lengths'][1]} tokens from the same generator (loss on the "
               f"copies of the key only) in {q['train_seconds']:.0f} s; untrained (same initialisation): "
               f"overall accuracy {result['untrained']['overall']:.2f}.", ""]
        figs["untrained"] = passkey_heatmap(result["untrained"], out / "plots" / "passkey_heatmap_untrained.png",
                                            "untrained (same initialisation)")
        md += ["![untrained](plots/passkey_heatmap_untrained.png)", "", _grid_table(result["untrained"]), ""]
    md += ["## Examples", "", md_table(["length", "depth", "key", "continuation", "right"],
                                        [[e["length"], e["depth"], e["key"], repr(e["continuation"]), e["correct"]]
                                         for e in result["examples"]]), ""]
    result["plots"] = {k: str(v) for k, v in figs.items()}
    _write(out, "moelab eval passkey", md, result)


# ---- context ------------------------------------------------------------------------------------
def context_plot(result: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["length"] for r in result["rows"]]
    ax.plot(xs, [r["bucket_ppl"] for r in result["rows"]], "o-", label="tokens with context in the bucket")
    ax.plot(xs, [r["window_ppl"] for r in result["rows"]], "s--", label="whole window of that length")
    if len(result["domains"]) > 1:
        for dom, d in result["domains"].items():
            ax.plot(xs, [r["bucket_ppl"] for r in d["rows"]], ".:", alpha=0.7, label=f"{dom} ({d['windows']} windows)")
    ax.set_xscale("log", base=2), ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("context length (tokens; a bucket is drawn at its upper end)"), ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8)
    ax.set_title(f"perplexity vs context: {result['source']}", fontsize=10)
    return save_figure(fig, path)


def write_context_report(out: Path, result: dict) -> None:
    prepare_output_dir(out)
    plot = context_plot(result, out / "plots" / "perplexity_vs_context.png")
    rows = [[r["length"], f"{r['bucket'][0]}-{r['bucket'][1]}", r["bucket_tokens"], r["bucket_loss"], r["bucket_ppl"],
             r["window_ppl"]] for r in result["rows"]]
    md = ["# Perplexity against context length", "",
          f"Source: `{result['source']}`; data: {result['documents']} ({result['windows']} windows of "
          f"{result['window']} tokens from {result['documents_used']} documents). The token at position c of a "
          "window is predicted from the c tokens before it; a bucket averages the tokens whose context is in its "
          "range, a window row averages positions 1 .. length - 1 (the perplexity of a window that long).", "",
          "![perplexity vs context length](plots/perplexity_vs_context.png)", "",
          md_table(["length", "context of the bucket", "tokens", "bucket loss", "bucket ppl", "window ppl"], rows), ""]
    if len(result["domains"]) > 1:
        md += ["## By domain (bucket perplexity)", "",
               md_table(["domain", "windows", *[str(r["length"]) for r in result["rows"]]],
                        [[dom, d["windows"], *[r["bucket_ppl"] for r in d["rows"]]]
                         for dom, d in result["domains"].items()]), ""]
    result["plots"] = {"perplexity_vs_context": str(plot)}
    _write(out, "moelab eval context", md, result)


# ---- eval lm / eval choice ---------------------------------------------------------------------
def write_lm_report(out: Path, r: dict) -> None:
    """result.json, report.md / .html and plots/ppl_by_domain.png (bars with the 95% intervals)."""
    prepare_output_dir(out)
    names = list(r["domains"]) + ["overall"]
    vals = [*r["domains"].values(), r["overall"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    err = [[v["ppl"] - v["ppl_ci95"][0] for v in vals], [v["ppl_ci95"][1] - v["ppl"] for v in vals]]
    ax.bar(names, [v["ppl"] for v in vals], yerr=err, capsize=4, color=["tab:blue"] * len(r["domains"]) + ["tab:gray"])
    ax.set_ylabel("perplexity (95% bootstrap CI)"), ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{r['source']} on {r['data']} ({r['split']})", fontsize=9)
    save_figure(fig, out / "plots" / "ppl_by_domain.png")
    rows = [[n, v["loss"], v["ppl"], f"{v['ppl_ci95'][0]:.3f} - {v['ppl_ci95'][1]:.3f}", v["tokens"], v["documents"]]
            for n, v in zip(names, vals)]
    md = [f"# moelab eval lm: {r['source']}", "",
          f"Data `{r['data']}` ({r['split']} split), windows of {r['seq_len']} tokens; 95% intervals from "
          f"{r['bootstrap_resamples']} bootstrap resamples of the documents (seed {r['seed']}).", "",
          md_table(["domain", "loss (nats/token)", "perplexity", "perplexity 95% CI", "tokens", "documents"], rows),
          "", "![perplexity by domain](plots/ppl_by_domain.png)", ""]
    _write(out, f"moelab eval lm {r['source']}", md, r)


def write_choice_report(out: Path, r: dict) -> None:
    """result.json, report.md / .html and plots/accuracy.png (acc and acc_norm ± stderr, chance)."""
    prepare_output_dir(out)
    names = list(r["tasks"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(names))
    for off, key in ((-0.2, "acc"), (0.2, "acc_norm")):
        ax.bar([i + off for i in x], [r["tasks"][n][key] for n in names], width=0.4, label=key,
               yerr=[r["tasks"][n][f"{key}_stderr"] for n in names], capsize=4)
    for i, n in enumerate(names):
        ax.plot([i - 0.45, i + 0.45], [r["tasks"][n]["chance"]] * 2, "k--", lw=1)
    ax.set_xticks(list(x), names), ax.set_ylabel("accuracy (± standard error; dashed: chance)"), ax.legend()
    ax.set_ylim(0, 1), ax.grid(alpha=0.3, axis="y")
    save_figure(fig, out / "plots" / "accuracy.png")
    rows = [[n, t["n"], f"{t['acc']:.3f} ± {t['acc_stderr']:.3f}", f"{t['acc_norm']:.3f} ± {t['acc_norm_stderr']:.3f}",
             f"{t['chance']:.3f}"] for n, t in r["tasks"].items()]
    md = [f"# moelab eval choice: {r['source']}", "",
          f"Zero-shot multiple choice on `{r['tasks_source']}` (log-likelihood of each choice; acc_norm divides it "
          "by the choice's length in characters).", "",
          md_table(["task", "questions", "acc", "acc_norm", "chance"], rows), "", "![accuracy](plots/accuracy.png)", ""]
    _write(out, f"moelab eval choice {r['source']}", md, r)
