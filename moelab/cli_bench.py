"""`moelab bench <name>`: measurements taken side by side in one process, reported as ratios."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub, formatter) -> None:
    p = sub.add_parser("bench", help="side-by-side benchmarks (aoe)", formatter_class=formatter,
                       description="Time models side by side in one process (interleaved repetitions) and report "
                                   "ratios; absolute times on a shared CPU are not comparable between runs.",
                       epilog="example:\n  moelab bench aoe --preset tiny --out runs/bench_aoe\n"
                              "  moelab bench aoe --d-low 64 --reps 11 --json")
    p.add_argument("name", choices=["aoe"])
    p.add_argument("--preset", default="tiny", help="the router-based MoE to compare against")
    p.add_argument("--d-low", type=int, help="AoE d_low (default d_model / 4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions per model")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write result.json and report.md/.html here")
    p.add_argument("--json", action="store_true", help="print result.json to stdout")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from moelab.bench.aoe import bench_aoe, write_bench

    result = bench_aoe(args.preset, args.d_low, args.batch_size, args.seq_len, args.reps, args.seed, args.threads)
    if args.out:
        write_bench(result, Path(args.out))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"AoE (d_low {result['d_low']}) / MoE ({result['preset']}): tokens/s "
              f"{result['aoe_tokens_per_s_ratio']:.3f}x, activation memory {result['aoe_activation_bytes_ratio']:.3f}x")
    return 0
