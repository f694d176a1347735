"""`moelab bench <name>`: measurements taken side by side in one process, reported as ratios."""

from __future__ import annotations

import json
from pathlib import Path

from moelab.errors import ConfigError

# the moe-layer shapes of moelab.bench.harness.SHAPES, named here so `--help` imports no torch (a test keeps them equal)
SHAPE_NAMES = ("tiny-train", "fine-grained", "bigger", "decode1", "decode8", "decode1-bigger", "decode8-bigger")
NAMES = ["moe-layer", "train", "generate", "engine", "aoe", "kv-cache", "speculative", "distributed", "ckpt", "all"]


def register(sub, formatter) -> None:
    p = sub.add_parser("bench", help="side-by-side benchmarks (moe-layer, train, generate, engine, aoe, kv-cache, speculative, "
                            "distributed, ckpt, all)",
                       formatter_class=formatter,
                       description="Time moelab against transformers (or AoE against MoE) side by side in one "
                                   "process, with identical weights and outputs checked equal first; report ratios. "
                                   "`all` runs every benchmark and writes BENCHMARKS.md.",
                       epilog="examples:\n  moelab bench moe-layer --shape fine-grained\n"
                              "  moelab bench train --json\n  moelab bench distributed   # 1 vs 2 processes\n  moelab bench aoe --preset tiny --out runs/bench_aoe\n"
                              "  moelab bench ckpt --out runs/bench_ckpt   # checkpoint save/verify cost, 671B projection\n"
                              "  moelab bench all --markdown BENCHMARKS.md   # what `make bench` runs")
    p.add_argument("name", choices=NAMES)
    p.add_argument("--shape", action="append",
                   help=f"moe-layer shape (repeatable; default: all): {', '.join(SHAPE_NAMES)}")
    p.add_argument("--quick", action="store_true", help="CI-sized shapes; only checks that outputs match")
    p.add_argument("--preset", default="tiny", help="aoe: the router-based MoE to compare against")
    p.add_argument("--d-low", type=int, help="aoe: d_low (default d_model / 4)")
    p.add_argument("--batch-size", type=int, default=16, help="aoe: batch size")
    p.add_argument("--seq-len", type=int, default=128, help="aoe: sequence length")
    p.add_argument("--reps", type=int, help="interleaved repetitions per contender")
    p.add_argument("--compile", action="store_true",
                   help="generate: add moelab with torch.compile'd blocks (compiling takes about a minute)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="ckpt: measure the disk of this directory (default: the system's temp directory)")
    p.add_argument("--out", help="write result.json and report.md/.html here")
    p.add_argument("--markdown", help="all: write the BENCHMARKS.md table here")
    p.add_argument("--json", action="store_true", help="print result.json to stdout")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import torch

    from moelab.bench import harness
    from moelab.bench.aoe import bench_aoe, write_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.name == "ckpt":  # a disk and hashing measurement, not a side-by-side race: not part of `all`
        from moelab.bench.ckpt import bench_ckpt, summary, write_bench as write_ckpt

        result = bench_ckpt(quick=args.quick, reps=args.reps, directory=args.dir)
        if args.out:
            write_ckpt(result, Path(args.out))
        print(json.dumps(result, indent=1) if args.json else "\n".join(summary(result)))
        return 0
    reps = args.reps or (1 if args.quick else 5)
    unknown = [s for s in args.shape or [] if s not in harness.SHAPES]
    if unknown:
        raise ConfigError("--shape", unknown[0], f"unknown moe-layer shape; one of {', '.join(harness.SHAPES)}")
    shapes = args.shape or list(harness.SHAPES)
    results = {}
    if args.name in ("moe-layer", "all"):
        results["moe_layer"] = [harness.bench_moe_layer(s, reps=reps, quick=args.quick, seed=args.seed) for s in shapes]
    if args.name in ("train", "all"):
        results["train"] = harness.bench_train(reps=reps, quick=args.quick, seed=args.seed)
    if args.name in ("generate", "all"):
        results["generate"] = harness.bench_generate(reps=max(1, reps // 2), quick=args.quick, seed=args.seed,
                                                    compiled=args.compile)
    if args.name in ("engine", "all"):
        results["engine"] = harness.bench_engine(reps=max(1, reps // 2), quick=args.quick, seed=args.seed)
    if args.name in ("aoe", "all"):
        results["aoe"] = bench_aoe(args.preset, args.d_low, args.batch_size, args.seq_len, reps, args.seed)
        if args.out and args.name == "aoe":
            write_bench(results["aoe"], Path(args.out))
    if args.name in ("kv-cache", "all"):
        from moelab.bench.deepseek import bench_kv_cache

        results["kv_cache"] = bench_kv_cache(seed=args.seed)
    if args.name in ("speculative", "all"):
        from moelab.bench.deepseek import bench_speculative

        results["speculative"] = bench_speculative(quick=args.quick, seed=args.seed)
    if args.name in ("distributed", "all"):
        from moelab.bench.distributed import bench_distributed

        results["distributed"] = bench_distributed(reps=max(1, reps // 2), quick=args.quick, seed=args.seed,
                                                   threads=args.threads)
    if args.out and args.name != "aoe":
        from moelab.bench.markdown import write_results

        write_results(results, Path(args.out))
    if args.markdown:
        from moelab.bench.markdown import benchmarks_markdown
        from moelab.fileio import write_atomic

        write_atomic(Path(args.markdown), benchmarks_markdown(results))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        from moelab.bench.markdown import summary_lines

        print("\n".join(summary_lines(results)))
    return 0
