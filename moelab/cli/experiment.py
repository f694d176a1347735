"""`moelab experiment <name>`: experiments that train several variants (or study a given model) and
write a report."""

from __future__ import annotations

import json
from pathlib import Path

from moelab.errors import MoelabError

TRAINING = ("routers", "capacity", "aoe-ablation", "aoe-strategies")


def register(sub, formatter) -> None:
    p = sub.add_parser("experiment", help="run an experiment (routers, capacity, aoe-ablation, aoe-strategies, "
                                          "routerless)", formatter_class=formatter,
                       description="Train variants side by side on the built-in corpus, or (routerless) study a "
                                   "trained model; writes result.json, report.md/.html and plots/ into --out.",
                       epilog="examples:\n  moelab experiment routers --quick --out runs/exp_routers\n"
                              "  moelab experiment capacity --out runs/exp_capacity --steps 300\n"
                              "  moelab experiment aoe-ablation --out runs/exp_aoe\n"
                              "  moelab experiment routerless runs/tiny --out runs/routerless   "
                              "# a moelab run, checkpoint or HF directory")
    p.add_argument("name", choices=[*TRAINING, "routerless"])
    p.add_argument("source", nargs="?", help="routerless only: the trained MoE (run dir, checkpoint or HF directory)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="CI-sized run (< 2 min on 2 cores), same code")
    p.add_argument("--steps", type=int, help="training steps per variant (default: 300 full, 20 quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="builtin", help="corpus: builtin, a text file, a directory or a JSONL")
    p.add_argument("--aoe-aux", default="sum", choices=("sum", "authors"),
                   help="aoe-ablation / aoe-strategies: L_aux per MoE layer summed over layers (moelab), or over all "
                        "layers at once as the AoE authors' code (alpha * K / L per layer)")
    p.add_argument("--json", action="store_true", help="print result.json to stdout")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_experiment)


def cmd_experiment(args) -> int:
    from moelab.experiments import EXPERIMENTS
    from moelab.experiments.common import ExperimentSettings

    if args.name == "routerless":
        if not args.source:
            raise MoelabError("moelab experiment routerless needs SOURCE: a trained MoE (a moelab run, a checkpoint "
                              "or an HF directory), e.g. `moelab experiment routerless runs/tiny --out runs/rl`")
        from moelab.experiments.routerless import run_routerless_study

        result = run_routerless_study(args.source, Path(args.out), data=args.data, quick=args.quick, seed=args.seed,
                                      progress=not args.no_progress)
    else:
        if args.source:
            raise MoelabError(f"moelab experiment {args.name} takes no SOURCE (got {args.source!r}); only "
                              "routerless studies a given model")
        settings = ExperimentSettings(out=Path(args.out), quick=args.quick, seed=args.seed, steps=args.steps,
                                      data=args.data, progress=not args.no_progress, aoe_aux=args.aoe_aux)
        result = EXPERIMENTS[args.name](settings)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {Path(args.out) / 'report.md'} and result.json")
    return 0
