"""CLI commands for training, generation and run reports: `moelab train | generate | report`.

`moelab train` builds its flags from the run config dataclasses with tyro: every field of
TrainConfig and of the nested ModelConfig is a flag (``--steps``, ``--model.moe.num-experts``).
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--report", action="store_true", help="write the run report when training ends")
    p.add_argument("--analyze", action="store_true",
                   help="end with `moelab analyze` of the final checkpoint on the run's data (RUN/analysis/)")
    p.add_argument("--analyze-tokens", type=int, default=100_000, help="tokens for --analyze")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (runs torchrun; gloo on CPU, NCCL on GPUs); the global batch "
                        "and the losses stay those of one process (docs/distributed.md)")
    p.add_argument("--ep", type=int, help="expert-parallel size, short for --parallel.ep")
    p.set_defaults(func=cmd_train, allow_extra=True, parser=p)

    p = sub.add_parser("generate", help="generate text from a checkpoint or run", formatter_class=formatter,
                       description="Sample continuations with a KV cache; several --prompt run as one left-padded "
                                   "batch.",
                       epilog='examples:\n  moelab generate runs/tiny --prompt "def main(" --max-new-tokens 64\n'
                              '  moelab generate runs/tiny --prompt "def f(" --prompt "The" --stop "\\n\\n" --stream\n'
                              '  moelab generate runs/ds3 --prompt "x = " --speculative   # DeepSeek MTP drafts')
    p.add_argument("checkpoint", help="run directory (latest checkpoint) or checkpoint directory")
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut from the output")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--prefill-chunk", type=int, help="run long prompts through the cache this many tokens at a time")
    p.add_argument("--rolling-cache", action="store_true",
                   help="sliding-window layers keep only their window in the cache (constant memory)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--speculative", action="store_true",
                   help="greedy decoding drafted by the model's MTP module (DeepSeek-V3); prints the acceptance rate "
                        "and the speed-up over plain greedy decoding, timed side by side")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks first (pays off on long outputs: compiling takes ~1 min on CPU)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("report", help="write report.md/.html with plots for a training run", formatter_class=formatter,
                       epilog="example:\n  moelab report runs/tiny")
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true", help="print the report numbers as JSON")
    p.set_defaults(func=cmd_report)


def _base_config(args):
    from moelab.config import load_config
    from moelab.presets import get_preset
    from moelab.train import TrainConfig
    from moelab.train.config import RUN_CONFIG

    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise MoelabError("--resume continues the run in place; drop --out or make it equal to --resume")
        path = Path(args.resume) / RUN_CONFIG
        if not path.is_file():
            raise MoelabError(f"--resume {args.resume}: no {RUN_CONFIG}; not a moelab run directory")
        base = TrainConfig.load(path)
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
        result = _train_rank(cfg, run_dir, bool(args.resume))
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    else:
        result = train(cfg, run_dir, resume=bool(args.resume))
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


def _train_rank(cfg, run_dir, resume: bool):
    """One rank of a torchrun launch: errors name the rank; a lost peer is reported as such."""
    from moelab.train import train

    rank = os.environ.get("RANK", "?")
    try:
        return train(cfg, run_dir, resume=resume)
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


def cmd_generate(args) -> int:
    from moelab.inference.generate import generate
    from moelab.loading import load, load_tokenizer

    model = load(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    if args.compile:
        model.compile_blocks()
    if args.speculative or args.no_cache:
        if len(args.prompt) != 1 or args.stop or args.stream:
            raise ConfigError("--speculative/--no-cache", args.prompt,
                              "take one --prompt and no --stop/--stream (they run the single-sequence decoders)")
        args.prompt = args.prompt[0]
        if args.speculative:
            return _speculative(model, tokenizer, args)
        text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                        args.top_p, args.seed, use_cache=False)
        print(json.dumps({"prompt": args.prompt, "completion": text, "seed": args.seed}) if args.json
              else args.prompt + text)
        return 0
    from moelab.inference.engine import generate_batch

    prompts = [p if p else tokenizer.decode([tokenizer.eos_id]) for p in args.prompt]
    batch = len(prompts) > 1

    def stream(row: int, piece: str) -> None:
        # one prompt: the text as it comes; a batch interleaves rows, so each piece is tagged with its row
        sys.stdout.write(f"[{row}] {piece!r}\n" if batch else piece)
        sys.stdout.flush()

    if args.stream and not args.json and not batch:
        sys.stdout.write(prompts[0])
    results = generate_batch(model, [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts], args.max_new_tokens,
                             tokenizer=tokenizer, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, stop_strings=args.stop,
                             stream=stream if args.stream and not args.json else None,
                             prefill_chunk=args.prefill_chunk, rolling_cache=args.rolling_cache)
    if args.json:
        rows = [{"prompt": p, "completion": r.text, "finish_reason": r.finish_reason, "token_ids": r.token_ids,
                 "logprobs": r.logprobs} for p, r in zip(prompts, results)]
        print(json.dumps({"seed": args.seed, "results": rows} if batch else {**rows[0], "seed": args.seed}))
    elif args.stream:
        sys.stdout.write("\n")
    else:
        for p, r in zip(prompts, results):
            sys.stdout.write(p + r.text + "\n" + ("\n" if batch else ""))
    return 0


def _speculative(model, tokenizer, args) -> int:
    """Greedy decoding drafted by MTP, verified against plain greedy decoding and timed against it
    (alternating runs, medians): the speed-up is a ratio measured in this process."""
    import statistics
    import time

    import torch

    from moelab.inference.generate import generate_ids
    from moelab.inference.speculative import speculative_generate_ids

    ids = torch.tensor([tokenizer.encode(args.prompt) or [tokenizer.eos_id]])
    times = {"greedy": [], "speculative": []}
    for _ in range(3):
        t0 = time.perf_counter()
        ref = generate_ids(model, ids, args.max_new_tokens, eos_id=tokenizer.eos_id)
        times["greedy"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out, stats = speculative_generate_ids(model, ids, args.max_new_tokens, eos_id=tokenizer.eos_id)
        times["speculative"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    new = [t for t in out[0, ids.shape[1]:].tolist() if t != tokenizer.eos_id]
    result = {"prompt": args.prompt, "completion": tokenizer.decode(new), **stats.to_dict(),
              "same_as_greedy": bool(torch.equal(out, ref)), "median_s": med,
              "speedup": med["greedy"] / med["speculative"]}
    if args.json:
        print(json.dumps(result))
    else:
        sys.stdout.write(args.prompt + result["completion"] + "\n")
        print(f"MTP drafts accepted {stats.accepted}/{stats.drafted} ({stats.acceptance_rate:.0%}), "
              f"{stats.tokens_per_forward:.2f} tokens per main-model forward, {result['speedup']:.2f}x plain greedy "
              f"tokens/s (same tokens: {'yes' if result['same_as_greedy'] else 'NO'})")
    return 0


def cmd_report(args) -> int:
    from moelab.reports.run import write_run_report

    paths = write_run_report(args.run)
    if args.json:
        print(paths["json"].read_text())
    else:
        print(f"wrote {paths['md']} and {paths['html']}")
    return 0
