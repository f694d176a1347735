"""The one report writer: markdown + HTML pages with PNG plots (matplotlib, Agg) and the JSON of every
number shown. Run reports, ``moelab compare``, analyses, evals, experiments, benchmarks and the
torture harness all write through it."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moelab.fileio import write_atomic  # noqa: E402


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_to_html(title: str, markdown: str) -> str:
    """A small converter for the markdown moelab writes: headings, tables, images, code blocks, text."""
    out, in_code, in_table = [], False, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-:") for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}" width="720"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    style = ("body{font-family:sans-serif;max-width:900px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}pre{background:#f4f4f4;padding:8px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_report(out_dir: Path, title: str, markdown: str, result: dict, json_name: str = "report.json",
                 force: bool = False) -> dict[str, Path]:
    """report.md, report.html and ``json_name`` (``result``: every number shown) in ``out_dir``: a new
    directory, or one moelab wrote (``.moelab``); a non-empty directory of someone else's files only
    with ``force`` (moelab.checkpoint.atomic.prepare_output_dir; nothing in it is deleted)."""
    from moelab.checkpoint.atomic import prepare_output_dir

    out_dir = prepare_output_dir(out_dir, force=force, fix="choose another output directory, or pass --force "
                                                           "(force=True) to write into it")
    paths = {"md": out_dir / "report.md", "html": out_dir / "report.html", "json": out_dir / json_name}
    write_atomic(paths["md"], markdown)
    write_atomic(paths["html"], markdown_to_html(title, markdown))
    write_atomic(paths["json"], json.dumps(result, indent=2) + "\n")
    return paths
