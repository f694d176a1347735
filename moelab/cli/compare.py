"""`moelab compare RUN_A RUN_B ...`: runs side by side (moelab.reports.compare)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub, formatter) -> None:
    p = sub.add_parser("compare", help="one table and shared plots across training runs", formatter_class=formatter,
                       description="Compare runs: final train and validation loss, per-domain validation perplexity, "
                                   "load balance, throughput and parameter counts, with shared plots; writes "
                                   "result.json, report.md/.html and plots/ into --out.",
                       epilog="examples:\n  moelab compare runs/topk runs/switch runs/ds3 --out runs/compare\n"
                              "  moelab compare runs/a runs/b --json")
    p.add_argument("runs", nargs="+", help="two or more run directories")
    p.add_argument("--out", help="output directory")
    p.add_argument("--json", action="store_true", help="print result.json to stdout")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from moelab.reports.compare import compare_runs

    r = compare_runs(args.runs, args.out)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    for s in r["runs"]:
        val = "n/a" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
        print(f"{s['name']:<24} step {s['steps']:<6} train LM loss {s['train_lm_loss']:.4f}  val loss {val}  "
              f"{s['median_tokens_per_s']:,.0f} tokens/s")
    if args.out:
        print(f"report: {Path(args.out) / 'report.md'}")
    return 0
