"""`moelab train` and `moelab report` (a training run's report).

`moelab train` builds its flags from the run config dataclasses with tyro: every field of
TrainConfig and of the nested ModelConfig is a flag (``--steps``, ``--model.moe.num-experts``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from moelab.errors import ConfigError, MoelabError

TRAIN_EPILOG = """examples:
  moelab train --preset tiny --steps 300 --out runs/tiny
  moelab train --config run.yaml --out runs/exp1 --lr 1e-3 --model.moe.router.top-k 1
  moelab train --resume runs/tiny --steps 600     # continue exactly where it stopped
  moelab train --preset tiny --nproc 2 --ep 2 --out runs/ep2   # 2 processes, experts split over both
  torchrun --nproc-per-node 8 -m moelab.train --preset deepseek-v3-tiny --ep 8 --out runs/ds  # same, by hand

Every field of the run config is a flag; `moelab train --help` lists them all below."""


def register(sub, formatter) -> None:
    p = sub.add_parser("train", help="train a model on the built-in corpus or your data", add_help=False,
                       formatter_class=formatter, allow_abbrev=False, epilog=TRAIN_EPILOG,
                       description="Train an MoE language model; writes metrics, checkpoints and a tokenizer to --out.")
    p.add_argument("-h", "--help", action="store_true", help="show this help and every config flag")
    p.add_argument("--preset", help="model preset to start from (default: tiny)")
    p.add_argument("--config", help="YAML/JSON run config (train fields + `model:`) or a bare model config")
    p.add_argument("--out", help="run directory to create (must not exist or be empty)")
    p.add_argument("--resume", help="run directory to continue from its latest checkpoint")
    p.add_argument("--allow-data-change", action="store_true",
                   help="--resume even when the data files differ from those the checkpoint was trained on")
    p.add_argument("--report", action="store_true", help="write the run report when training ends")
    p.add_argument("--analyze", action="store_true",
                   help="end with `moelab analyze` of the final checkpoint on the run's data (RUN/analysis/)")
    p.add_argument("--analyze-tokens", type=int, default=100_000, help="tokens for --analyze")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (runs torchrun; gloo on CPU, NCCL on GPUs); the global batch "
                        "and the losses stay those of one process (docs/distributed.md)")
    p.add_argument("--ep", type=int, help="expert-parallel size, short for --parallel.ep")
    p.set_defaults(func=cmd_train, allow_extra=True, parser=p)


def register_report(sub, formatter) -> None:
    p = sub.add_parser("report", help="write report.md/.html with plots for a training run", formatter_class=formatter,
                       epilog="example:\n  moelab report runs/tiny")
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true", help="print the report numbers as JSON")
    p.set_defaults(func=cmd_report)


def _base_config(args):
    from moelab.config import load_config
    from moelab.presets import get_preset
    from moelab.train import TrainConfig

    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise MoelabError("--resume continues the run in place; drop --out or make it equal to --resume")
        from moelab.train.resume import resume_checkpoint, resumed_config

        # the checkpoint's verified run_config.yaml (the trainer warns when RUN/config.yaml differs)
        base = resumed_config(Path(args.resume), resume_checkpoint(Path(args.resume)), warn=False)[0]
    elif args.config:
        try:
            base = TrainConfig.load(Path(args.config))
        except ValueError:
            base = TrainConfig(model=load_config(args.config))
    else:
        base = TrainConfig()
    if args.preset:
        base.model = get_preset(args.preset)
    return base


def parse_train_config(args, extra: list[str]):
    import tyro

    from moelab.train import TrainConfig

    base = _base_config(args)
    return tyro.cli(TrainConfig, default=base, args=extra, prog="moelab train",
                    config=(tyro.conf.AvoidSubcommands,))


def cmd_train(args, extra: list[str]) -> int:
    if args.help:
        args.parser.print_help()
        print("\nconfig flags:")
        parse_train_config(argparse.Namespace(resume=None, config=None, preset=None, out=None), ["--help"])
        return 0
    from moelab.distributed.runtime import launched_world_size
    from moelab.train import train

    if args.ep is not None:
        extra = [*extra, "--parallel.ep", str(args.ep)]
    cfg = parse_train_config(args, extra)
    run_dir = args.resume or args.out
    if not run_dir:
        raise MoelabError("train needs --out RUN_DIR (or --resume RUN_DIR)")
    if args.nproc < 1:
        raise ConfigError("--nproc", args.nproc, "must be >= 1")
    world = launched_world_size()
    if args.nproc > 1 and world == 1:
        from moelab.distributed.runtime import check_batch

        cfg.parallel.mesh_shape(args.nproc, cfg.model.moe.num_experts if cfg.model.moe else None)  # fail early
        check_batch(cfg.batch_size, args.nproc)
        if cfg.compile:
            raise ConfigError("compile", True, "is not supported with several processes yet; drop --compile")
        return _launch(args)
    if world > 1:
        result = _train_rank(cfg, run_dir, bool(args.resume), args.allow_data_change)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    else:
        result = train(cfg, run_dir, resume=bool(args.resume), allow_data_change=args.allow_data_change)
    print(f"trained to step {result.final_step}: val loss {result.val.get('val_loss', float('nan')):.4f} "
          f"(ppl {result.val.get('val_ppl', float('nan')):.2f}); unigram entropy {result.unigram_entropy:.4f} nats")
    if args.report:
        from moelab.reports.run import write_run_report

        print(f"report: {write_run_report(run_dir)['md']}")
    if args.analyze:
        from pathlib import Path

        from moelab.analysis import analyze

        r = analyze(run_dir, Path(run_dir) / "analysis", data=cfg.data, max_tokens=args.analyze_tokens,
                    progress=cfg.progress, seed=cfg.seed)
        print(f"analysis: {r['report']}")
    return 0


def _launch(args) -> int:
    """Re-run this command on ``--nproc`` processes with torch's elastic launcher (what torchrun
    --standalone runs: one machine, c10d rendezvous on a free port, no restarts). A rank that fails
    stops the others; the exit status is non-zero and names the rank."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rest, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    n = args.nproc
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    if not args.debug:  # the launcher's own log lines repeat what the ranks printed
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "moelab.cli", *rest)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        how = f"signal {first.signal_name()}" if first.exitcode < 0 else f"exit status {first.exitcode}"
        raise MoelabError(f"training on {n} processes stopped: rank {rank} failed first ({how}); "
                          "anything it printed is above, and every other rank was stopped") from None
    return 0


def _train_rank(cfg, run_dir, resume: bool, allow_data_change: bool = False):
    """One rank of a torchrun launch: errors name the rank; a lost peer is reported as such."""
    from moelab.train import train

    rank = os.environ.get("RANK", "?")
    try:
        return train(cfg, run_dir, resume=resume, allow_data_change=allow_data_change)
    except MoelabError as e:
        raise MoelabError(f"[rank {rank}] {e}") from e
    except RuntimeError as e:  # gloo / NCCL: a peer died or a collective timed out
        if "Timed out" in str(e) or "timeout" in str(e).lower():
            why = f"a collective timed out after parallel.timeout_s={cfg.parallel.timeout_s:g} s (a rank hangs)"
        elif any(w in str(e) for w in ("Connection", "closed", "reset by peer", "Broken pipe", "NCCL")):
            why = "another rank stopped (its own error is above)"
        else:
            raise
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0]  # gloo's source location off
        raise MoelabError(f"[rank {rank}] {why}: {detail}") from e


def cmd_report(args) -> int:
    from moelab.reports.run import write_run_report

    paths = write_run_report(args.run)
    if args.json:
        print(paths["json"].read_text())
    else:
        print(f"wrote {paths['md']} and {paths['html']}")
    return 0
