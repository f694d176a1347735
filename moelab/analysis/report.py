"""The analysis report: PNG figures under ``figures/`` and one self-contained ``report.html`` (figures
embedded as base64), each section with a short "how to read this"."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from moelab.fileio import write_atomic
from moelab.reports.writer import plt, save_figure

COLORS = plt.get_cmap("tab20").colors


def _pick(layers: list[int]) -> list[int]:
    """First, middle and last analysed layer (distinct)."""
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def _fig_load(r: dict, fig_dir: Path) -> Path:
    picks = _pick(r["layers"])
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(4.2 * (len(picks) + 1), 3.4), squeeze=False)
    for ax, layer in zip(axes[0], picks):
        load = r["expert_load"][str(layer)]
        E = r["num_experts"][str(layer)]
        width = 0.8 / max(len(r["domains"]), 1)
        for j, d in enumerate(r["domains"]):
            if d in load:
                ax.bar(np.arange(E) + j * width, load[d], width=width, label=d, color=COLORS[j % 20])
        ax.axhline(1 / E, ls="--", color="k", lw=0.8)
        ax.set_title(f"layer {layer}"), ax.set_xlabel("expert"), ax.set_ylabel("share of assignments")
    axes[0][0].legend(fontsize=7)
    heat = np.array([r["expert_load"][str(i)]["all"] for i in r["layers"]])
    im = axes[0][-1].imshow(heat, aspect="auto", cmap="viridis")
    axes[0][-1].set_yticks(range(len(r["layers"])), [str(i) for i in r["layers"]])
    axes[0][-1].set_title("all domains"), axes[0][-1].set_xlabel("expert"), axes[0][-1].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0][-1], fraction=0.046)
    return save_figure(fig, fig_dir / "expert_load.png")


def _fig_consecutive(r: dict, fig_dir: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    L = r["layers"]
    c = [r["consecutive"][str(i)] for i in L]
    ax.plot(L, [x["first"] for x in c], "o-", label="first choice repeats")
    ax.plot(L, [x["either"] for x in c], "s-", label="choice sets overlap")
    ax.plot(L, [x["random_first"] for x in c], "--", color="tab:blue", alpha=0.6, label="random (first)")
    ax.plot(L, [x["random_either"] for x in c], "--", color="tab:orange", alpha=0.6, label="random (either)")
    ax.set_xlabel("layer"), ax.set_ylabel("rate over adjacent tokens"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    ax.set_xticks(L)  # layers are integers: no fractional ticks
    return save_figure(fig, fig_dir / "consecutive.png")


def _fig_specialization(r: dict, fig_dir: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    L = r["layers"]
    x = np.arange(len(L))
    ts = [r["token_specialization"][str(i)] for i in L]
    axes[0].bar(x, [t["value"] or 0 for t in ts], width=0.4, label="measured")
    axes[0].bar(x + 0.4, [t["chance"] or 0 for t in ts], width=0.4, color="0.6", label="chance (permuted)")
    axes[0].set_xticks(x + 0.2, [str(i) for i in L]), axes[0].set_ylim(0, 1)
    axes[0].set_xlabel("layer"), axes[0].set_ylabel("token specialisation"), axes[0].legend(fontsize=7)
    s = [r["routing_spread"][str(i)] for i in L]
    for k, (key, label, color) in enumerate((("by_token", "by token id", "tab:blue"),
                                             ("random_by_token", "chance, token groups", "lightsteelblue"),
                                             ("by_position", "by position", "tab:orange"),
                                             ("random_by_position", "chance, position groups", "navajowhite"))):
        axes[1].bar(x + 0.2 * k, [v[key] for v in s], width=0.2, label=label, color=color)
    axes[1].set_xticks(x + 0.3, [str(i) for i in L]), axes[1].set_xlabel("layer")
    axes[1].set_ylabel("std of routing distribution"), axes[1].legend(fontsize=7)
    return save_figure(fig, fig_dir / "specialization.png")


def _fig_similarity(r: dict, fig_dir: Path) -> Path:
    picks = _pick(r["layers"])
    kinds = ["gate", "up", "down"] + (["output"] if r["output_similarity"] else [])
    measure = r.get("output_similarity_measure", "cosine")
    fig, axes = plt.subplots(len(picks), len(kinds), figsize=(2.9 * len(kinds), 2.6 * len(picks)), squeeze=False)
    for row, layer in zip(axes, picks):
        for ax, k in zip(row, kinds):
            m = r["output_similarity"][str(layer)] if k == "output" else r["weight_similarity"][str(layer)][k]
            angular = k == "output" and measure == "angular"  # in [0, 1], orthogonal = 0.5
            im = ax.imshow(m, vmin=0 if angular else -1, vmax=1, cmap="coolwarm")
            title = f"layer {layer} output ({measure})" if k == "output" else f"layer {layer} {k} (cosine)"
            ax.set_title(title, fontsize=8), ax.set_xticks([]), ax.set_yticks([])
            if k == "output":
                fig.colorbar(im, ax=ax, fraction=0.046, label=measure)
    fig.colorbar(axes[0][0].images[0], ax=axes[:, :3], fraction=0.02, label="cosine (weights)")
    path = fig_dir / "expert_similarity.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")  # tight: no empty band above the grid
    plt.close(fig)
    return path


def _fig_norm(r: dict, fig_dir: Path) -> Path | None:
    if not r["router_vs_norm"]:
        return None
    L = r["layers"]
    mid = str(L[len(L) // 2])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].bar([str(i) for i in L], [r["router_top1_is_max_norm"][str(i)] or 0 for i in L])
    axes[0].axhline(r["router_vs_norm"][mid]["random"], ls="--", color="k", lw=0.8, label="random")
    axes[0].set_ylim(0, 1), axes[0].set_xlabel("layer"), axes[0].set_ylabel("top-1 is the max-norm expert")
    axes[0].legend(fontsize=7)
    im = axes[1].imshow(r["router_vs_norm"][mid]["rank_matrix"], cmap="magma")
    axes[1].set_xlabel("router score rank"), axes[1].set_ylabel("output norm rank"), axes[1].set_title(f"layer {mid}")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    return save_figure(fig, fig_dir / "router_vs_norm.png")


def _fig_drops(r: dict, fig_dir: Path) -> Path | None:
    if not r["drop_by_position"]:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for layer, v in r["drop_by_position"].items():
        ax.plot(v, label=f"layer {layer}")
    ax.set_xlabel("position in the sequence"), ax.set_ylabel("dropped fraction"), ax.legend(fontsize=7)
    return save_figure(fig, fig_dir / "drop_by_position.png")


def _fig_training(r: dict, fig_dir: Path) -> Path | None:
    t = r.get("routing_over_training")
    if not t:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, key, label in ((axes[0], "agreement", "top-1 agreement with final (per token)"),
                           (axes[1], "id_agreement", "overlap with final (per token id)")):
        for k, (layer, v) in enumerate(t[key].items()):
            color = COLORS[k % 20]
            ax.plot(t["steps"], [np.nan if x is None else x for x in v], "o-", color=color, label=f"layer {layer}")
            ax.plot(t["steps"], [np.nan if x is None else x for x in t[f"{key}_chance"][layer]], "--", color=color,
                    alpha=0.6)
        ax.set_xlabel("checkpoint step"), ax.set_ylabel(label, fontsize=8), ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7), ax.grid(alpha=0.3)
    axes[1].set_title("dashed: chance (choices permuted over the same tokens)", fontsize=8)
    return save_figure(fig, fig_dir / "routing_over_training.png")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def _table(headers, rows) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>" + body + "</table>"


def _swatch(e: int) -> str:
    c = COLORS[e % 20]
    return f"rgb({int(c[0] * 255)},{int(c[1] * 255)},{int(c[2] * 255)})"


def _token_view_html(view: dict) -> str:
    parts = [f"<p>Top-1 expert of each token at layer {view['layer']} (colour = expert).</p>"]
    used = sorted({e for d in view["documents"] for e in d["top1"] if e >= 0})
    parts.append("<p class='legend'>Colour legend: " + " ".join(
        f'<span style="background:{_swatch(e)};padding:0 6px">expert {e}</span>' for e in used) + "</p>")
    for d in view["documents"]:
        spans = "".join(
            f'<span title="expert {e}" style="background:rgb({int(COLORS[e % 20][0] * 255)},'
            f'{int(COLORS[e % 20][1] * 255)},{int(COLORS[e % 20][2] * 255)})">{html.escape(t)}</span>'
            for t, e in zip(d["tokens"], d["top1"]) if e >= 0)
        parts.append(f"<h4>{html.escape(d['domain'])} ({html.escape(d['doc_id'])})</h4>"
                     f'<pre style="white-space:pre-wrap">{spans}</pre>')
    return "".join(parts)


def write_analysis_report(out: Path, r: dict) -> Path:
    figs = out / "figures"
    L = r["layers"]
    sections = []

    def section(title, how, fig=None, extra=""):
        body = (_img(fig) if fig else "") + extra
        sections.append(f"<h2>{html.escape(title)}</h2>{body}<p class='how'><b>How to read this.</b> {how}</p>")

    section("1. Expert load per domain and layer (Mixtral Fig. 7)",
            "Each bar is the share of a domain's top-k assignments (every one of a token's K choices) that went to "
            "an expert; each domain's bars sum to 1 and the dashed line is 1/E. Domain specialisation shows as bars "
            "of one domain far from the others.", _fig_load(r, figs))
    cons_rows = [[i, r["consecutive"][str(i)]["first"], r["consecutive"][str(i)]["random_first"],
                  r["consecutive"][str(i)]["either"], r["consecutive"][str(i)]["random_either"],
                  r["consecutive"][str(i)]["pairs"]] for i in L]
    section("2. Consecutive tokens (Mixtral Table 5)",
            "How often two adjacent tokens of one document share their first choice, or any chosen expert, pooled "
            "over all pairs. Rates above the random baselines mean routing follows local context (Mixtral: near "
            "random at layer 0, well above at middle layers).", _fig_consecutive(r, figs),
            _table(["layer", "first", "random first", "either", "random either", "pairs"], cons_rows))
    section("3. Token view (Mixtral Fig. 8)", "Runs of one colour are tokens routed to the same expert.",
            None, _token_view_html(r["token_view"]))
    top = r["top_tokens"][str(L[len(L) // 2])]
    min_count = r["routing_spread"][str(L[0])]["min_count"]
    section("4. Context-independent specialisation (OpenMoE)",
            "Token specialisation is the fraction of tokens whose top-1 expert is the one their token id most often "
            "gets (1.0: routing is a function of the id). Right: the spread (std over experts) of the routing "
            "distribution of token-id groups vs position groups; OpenMoE finds token-id groups far more "
            f"concentrated. Only ids and positions seen at least {min_count} times count. Each statistic stands "
            "beside its chance level: the same statistic with the top-1 choices permuted over the same tokens "
            "(same expert load, same groups), so uneven load or rare ids alone do not read as specialisation. "
            "The table lists each expert's most frequent tokens at the middle layer.",
            _fig_specialization(r, figs),
            _table(["layer", "token specialisation", "chance", "ids counted", "spread by token id", "chance",
                    "spread by position", "chance"],
                   [[i, r["token_specialization"][str(i)]["value"], r["token_specialization"][str(i)]["chance"],
                     r["token_specialization"][str(i)]["ids"], r["routing_spread"][str(i)]["by_token"],
                     r["routing_spread"][str(i)]["random_by_token"], r["routing_spread"][str(i)]["by_position"],
                     r["routing_spread"][str(i)]["random_by_position"]] for i in L])
            + _table(["expert", "most frequent tokens (top-1)"], [[e, " ".join(repr(t) for t in toks)]
                                                                 for e, toks in enumerate(top)]))
    drops = _fig_drops(r, figs)
    section("5. Drops by position (OpenMoE)",
            "With a finite capacity, the fraction of selected experts dropped at each position of the sequence; "
            "a rising curve is OpenMoE's drop-towards-the-end." if drops else
            "The model is dropless at inference: no token is dropped.", drops)
    wv = r["weight_vs_output"].get(str(L[len(L) // 2]), {})
    section("6. Expert similarity (A Closer Look into MoE)",
            "Cosine similarity of every pair of experts' flattened gate / up / down matrices, and the mean over "
            "tokens of the " + ("angular similarity 1 - arccos(cos)/pi (the authors' measure: orthogonal outputs "
                                "= 0.5, opposite = 0)" if r.get("output_similarity_measure") == "angular" else
                                "cosine") + " of their outputs on the same token, first, middle and last layer. "
            "Red off the diagonal = similar experts. "
            + ("At the middle layer, weight similarity predicts output similarity with R^2 = "
               + ", ".join(f"{k} {v['r2']:.3f}" for k, v in wv.items() if v.get("r2") is not None) + "."
               if wv else ""), _fig_similarity(r, figs))
    section("7. Router vs expert output norm (A Closer Look; the motivation of AoE)",
            "Left: the fraction of tokens whose top-1 routed expert is the expert with the largest output norm "
            "(dashed: 1/E by chance). Right: counts of (norm rank, router rank); mass on the diagonal means the "
            "router ranks experts as their output norms do.", _fig_norm(r, figs))
    tr = _fig_training(r, figs)
    section("8. Routing over training (OpenMoE)",
            "Left: agreement of every checkpoint's top-1 routing with the final checkpoint's on the same tokens. "
            "Right: OpenMoE's view per token id, the overlap (1 - total variation) of each id's top-1 distribution "
            "with the final one's, over ids seen at least " + str((r.get("routing_over_training") or {}).get(
                "id_min_count")) + " times. Dashed lines: chance, the same with the checkpoint's choices permuted "
            "over the tokens (same load). An early plateau near 1, far above chance, means routing is fixed "
            "early." if tr else
            "Needs a run directory with two or more checkpoints.", tr)
    notes = "".join(f"<p><b>Note:</b> {html.escape(n)}</p>" for n in r["notes"])
    head = (f"<h1>moelab analyze: {html.escape(r['source'])}</h1>{notes}<p>{r['tokens']:,} tokens, "
            f"{r['documents']:,} documents, domains {', '.join(r['domains'])}; MoE layers {L}; "
            f"{r['seconds']:.1f} s.</p><p>{html.escape(layers_note(L))}</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>moelab analysis</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}.how{color:#444}"
            "code{font-family:monospace;color:#a31515;background:#f3f3f3;padding:0 2px}"
            "var,.math{font-family:serif;font-style:italic;color:#222}</style></head><body>"
            + head + "".join(sections) + "</body></html>")
    md = [f"# moelab analyze: {r['source']}", "", *[f"**Note:** {n}" for n in r["notes"]], "",
          f"{r['tokens']:,} tokens, {r['documents']:,} documents, domains {', '.join(r['domains'])}; "
          f"MoE layers {L}; {r['seconds']:.1f} s.", "", layers_note(L), "",
          "Every number is in result.json; figures and explanations are in report.html.", "", "## Figures", ""]
    md += [f"![{p.stem}](figures/{p.name})" for p in sorted(figs.glob("*.png"))]
    write_atomic(out / "report.md", "\n".join(md) + "\n")
    return write_atomic(out / "report.html", page)


def layers_note(layers: list[int]) -> str:
    """Say which layers the load and similarity figures show, and why (issue 24)."""
    picks = _pick(layers)
    return (f"The expert-load and similarity figures show layers {', '.join(map(str, picks))} of the "
            f"{len(layers)} analysed MoE layers {layers}: the first, middle and last, to keep the figures "
            "readable; the tables and result.json have every layer.")
