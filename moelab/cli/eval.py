"""`moelab eval lm | choice | passkey | context SOURCE`: loss and perplexity per domain with bootstrap
intervals, zero-shot multiple choice, and the Mixtral paper's long-context measurements (§3).
`moelab eval SOURCE --data ...` is short for `moelab eval lm SOURCE --data ...`."""

from __future__ import annotations

import json

from moelab.errors import ConfigError

EVALS = ("lm", "choice", "passkey", "context")


def _numbers(flag: str, text: str | None, kind):
    """'64,128 256' -> [64, 128, 256]; None stays None (the command's default)."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.replace(",", " ").split()]
    except ValueError as e:
        raise ConfigError(flag, text, f"give a comma-separated list of {'integers' if kind is int else 'numbers'}") from e
    if not values:
        raise ConfigError(flag, text, "give at least one value, e.g. " + ("64,128,256" if kind is int else "0,0.5,1"))
    return values


SOURCE_HELP = "a moelab run, checkpoint or model directory, or an HF directory"


def _outputs(p, required: bool = False) -> None:
    """--out, --json and --no-progress, as every eval takes them."""
    p.add_argument("--out", required=required,
                   help="output directory" if required else "write result.json, report.md/.html and plots/ here")
    p.add_argument("--json", action="store_true", help="print result.json to stdout")
    p.add_argument("--no-progress", action="store_true")


def _print(args, result: dict, lines: list[str]) -> int:
    """result.json on stdout with --json, else the summary lines and where the report is."""
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print("\n".join(lines))
    if args.out:
        print(f"report: {args.out}/report.md")
    return 0


def register(sub, formatter) -> None:
    p = sub.add_parser("eval", help="perplexity per domain, multiple choice, passkey, perplexity vs context length",
                       formatter_class=formatter,
                       description="Evaluations (definitions in docs/eval.md). `moelab eval SOURCE --data D` = "
                                   "`moelab eval lm SOURCE --data D`.",
                       epilog="examples:\n  moelab eval runs/tiny --data builtin --out runs/tiny/eval\n"
                              "  moelab eval choice runs/tiny --tasks builtin --out runs/tiny/choice\n"
                              "  moelab eval passkey runs/tiny --lengths 64,128,249 --out runs/tiny/passkey\n"
                              "  moelab eval passkey --quick --out runs/passkey_quick\n"
                              "  moelab eval context runs/tiny --lengths 16,32,64,128,256 --out runs/tiny/context")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    m = ev.add_parser(
        "lm", help="loss and perplexity overall and per domain, 95%% bootstrap intervals over documents",
        formatter_class=formatter,
        description="Score every document of --data (each cut into windows of --seq-len tokens) and report the "
                    "token-mean loss and perplexity overall and per domain, with percentile-bootstrap 95%% intervals "
                    "over documents. Works on moelab runs, checkpoints and models and on HF checkpoint directories.",
        epilog="examples:\n  moelab eval lm runs/tiny --data builtin --out runs/tiny/eval\n"
               "  moelab eval runs/tiny --data my.jsonl --split all --json   # the same, short form")
    m.add_argument("source", help=SOURCE_HELP)
    m.add_argument("--data", default="builtin", help="builtin, a .txt file, a directory or a JSONL with text/domain")
    m.add_argument("--split", default="val", help="val (default), train or all of the data's documents")
    m.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len)")
    m.add_argument("--max-documents", type=int, help="score only the first N documents")
    m.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--seed", type=int, default=0)
    _outputs(m)
    m.set_defaults(func=cmd_lm)

    ch = ev.add_parser(
        "choice", help="zero-shot multiple choice (log-likelihood per choice; acc and acc_norm ± stderr)",
        formatter_class=formatter,
        description="lm-evaluation-harness-style multiple choice on JSONL tasks ({task, context, choices, answer} "
                    "per line) or on the built-in offline tasks generated from the corpus (math-answer, "
                    "code-next-line). To run the harness's own tasks, see moelab.eval.harness (docs/eval.md).",
        epilog="examples:\n  moelab eval choice runs/tiny --tasks builtin --out runs/tiny/choice\n"
               "  moelab eval choice runs/tiny --tasks my_tasks.jsonl --json")
    ch.add_argument("source", help=SOURCE_HELP)
    ch.add_argument("--tasks", default="builtin", help="builtin or a JSONL task file")
    ch.add_argument("--per-task", type=int, default=100, help="builtin: questions per task")
    ch.add_argument("--seed", type=int, default=0)
    _outputs(ch)
    ch.set_defaults(func=cmd_choice)

    q = ev.add_parser(
        "passkey", help="passkey retrieval accuracy by prompt length and key depth (heatmap)", formatter_class=formatter,
        description="Hide a random pass key at a chosen depth of filler text (Mohtashami & Jaggi 2023), ask for it, "
                    "decode greedily and score exact retrieval of the digits. Writes result.json (every number), "
                    "report.md/.html and plots/passkey_heatmap.png into --out. --quick instead trains a tiny MoE "
                    "on the task for a minute and reports it before and after training.",
        epilog="examples:\n  moelab eval passkey runs/tiny --lengths 64,128,249 --depths 0,0.5,1 --trials 20 --out pk/\n"
               "  moelab eval passkey --quick --out runs/passkey_quick   # the task and the metric shown right")
    q.add_argument("source", nargs="?", help=SOURCE_HELP)
    q.add_argument("--lengths", help="prompt lengths in tokens of the model's tokenizer, e.g. 256,512,1024 "
                                     "(default: four lengths up to max_seq_len minus the answer)")
    q.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="where the key goes: fractions of the filler")
    q.add_argument("--trials", type=int, default=10, help="prompts (random keys) per length and depth")
    q.add_argument("--digits", type=int, default=5, help="digits of a pass key")
    q.add_argument("--intro", action="store_true", help="start with Landmark Attention's instruction sentence")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--quick", action="store_true", help="train a tiny model on the task and evaluate it (no SOURCE)")
    q.add_argument("--steps", type=int, default=800, help="--quick: training steps")
    _outputs(q, required=True)
    q.set_defaults(func=cmd_passkey)

    c = ev.add_parser(
        "context", help="perplexity against context length on held-out text (line plot)", formatter_class=formatter,
        description="Cut held-out documents into windows of max(--lengths) tokens, take the loss of every token "
                    "given the tokens before it in its window, and report perplexity by context length: per "
                    "bucket between consecutive lengths and for whole windows of each length. Writes result.json, "
                    "report.md/.html and plots/perplexity_vs_context.png into --out.",
        epilog="examples:\n  moelab eval context runs/tiny --lengths 16,32,64,128,256 --out runs/tiny/context\n"
               "  moelab eval context path/to/hf-model --data notes.txt --lengths 128,512,2048 --out ctx/")
    c.add_argument("source", help=SOURCE_HELP)
    c.add_argument("--lengths", required=True, help="context lengths in tokens, e.g. 64,128,256")
    c.add_argument("--data", default="builtin",
                   help="builtin (the built-in corpus's validation split), a .txt, .jsonl or a directory")
    c.add_argument("--max-windows", type=int, default=512, help="windows to evaluate, spread over documents")
    c.add_argument("--batch-size", type=int, default=8)
    _outputs(c, required=True)
    c.set_defaults(func=cmd_context)


def cmd_passkey(args) -> int:
    from moelab.eval import eval_passkey, quick_passkey

    lengths = _numbers("--lengths", args.lengths, int)
    depths = _numbers("--depths", args.depths, float)
    if args.digits <= 0:
        raise ConfigError("--digits", args.digits, "must be a positive number of digits")
    if args.quick:
        if args.source:
            raise ConfigError("SOURCE", args.source, "--quick trains its own model; give either SOURCE or --quick")
        if args.digits != 5 or args.intro:
            raise ConfigError("--quick", True, "the quick model is trained on 5-digit keys without the intro")
        result = quick_passkey(args.out, lengths, depths, args.trials, args.seed, args.steps,
                               progress=not args.no_progress)
    else:
        if not args.source:
            raise ConfigError("SOURCE", None, "give a model directory to evaluate, or --quick to train a tiny one")
        result = eval_passkey(args.source, args.out, lengths, depths, args.trials, args.seed, args.digits,
                              args.intro, args.batch_size, progress=not args.no_progress)
    g = result["grid"]
    lines = [f"passkey retrieval of {result['source']} ({result['trials']} trials per cell), accuracy by length:",
             "  " + "  ".join(f"{n}: {a:.2f}" for n, a in zip(g["lengths"], g["by_length"]))
             + f"  (all {g['overall']:.2f})"]
    if "untrained" in result:
        lines.append(f"untrained, same initialisation: {result['untrained']['overall']:.2f}; "
                     f"trained {result['quick']['steps']} steps in {result['quick']['train_seconds']:.0f} s")
    return _print(args, result, lines)


def cmd_context(args) -> int:
    from moelab.eval import eval_context

    lengths = _numbers("--lengths", args.lengths, int)
    result = eval_context(args.source, args.out, lengths, args.data, args.max_windows, args.batch_size,
                          progress=not args.no_progress)
    return _print(args, result, [
        f"perplexity of {result['source']} by context length ({result['windows']} windows of "
        f"{result['window']} tokens):",
        "  " + "  ".join(f"{r['length']}: {r['bucket_ppl']:.2f}" for r in result["rows"])])


def cmd_lm(args) -> int:
    from moelab.eval import eval_lm

    r = eval_lm(args.source, args.out, args.data, args.split, args.seq_len, args.max_documents, args.bootstrap,
                args.seed, args.batch_size, progress=not args.no_progress)
    o = r["overall"]
    return _print(args, r, [
        f"{r['source']} on {r['data']} ({r['split']}): loss {o['loss']:.4f}, perplexity {o['ppl']:.2f} "
        f"[95% CI {o['ppl_ci95'][0]:.2f}-{o['ppl_ci95'][1]:.2f}] over {o['tokens']:,} tokens, "
        f"{o['documents']} documents",
        *(f"  {d:<12} loss {v['loss']:.4f}  ppl {v['ppl']:.2f} [{v['ppl_ci95'][0]:.2f}-{v['ppl_ci95'][1]:.2f}]  "
          f"{v['tokens']:,} tokens" for d, v in r["domains"].items())])


def cmd_choice(args) -> int:
    from moelab.eval import eval_choice

    r = eval_choice(args.source, args.out, args.tasks, args.per_task, args.seed, progress=not args.no_progress)
    return _print(args, r, [
        f"{name:<16} n={t['n']:<4} acc {t['acc']:.3f} ± {t['acc_stderr']:.3f}  acc_norm {t['acc_norm']:.3f} ± "
        f"{t['acc_norm_stderr']:.3f}  (chance {t['chance']:.3f})" for name, t in r["tasks"].items()])
