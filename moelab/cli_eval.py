"""`moelab eval passkey | context SOURCE`: the Mixtral paper's long-context measurements (§3)."""

from __future__ import annotations

import json

from moelab.errors import ConfigError


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


def register(sub, formatter) -> None:
    p = sub.add_parser("eval", help="long-context evaluations: passkey retrieval, perplexity vs context length",
                       formatter_class=formatter,
                       description="Evaluations of the Mixtral paper's §3 (definitions in docs/eval.md).",
                       epilog="examples:\n  moelab eval passkey runs/tiny --lengths 64,128,249 --out runs/tiny/passkey\n"
                              "  moelab eval passkey --quick --out runs/passkey_quick\n"
                              "  moelab eval context runs/tiny --lengths 16,32,64,128,256 --out runs/tiny/context")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    q = ev.add_parser(
        "passkey", help="passkey retrieval accuracy by prompt length and key depth (heatmap)", formatter_class=formatter,
        description="Hide a random pass key at a chosen depth of filler text (Mohtashami & Jaggi 2023), ask for it, "
                    "decode greedily and score exact retrieval of the digits. Writes result.json (every number), "
                    "report.md/.html and plots/passkey_heatmap.png into --out. --quick instead trains a tiny MoE "
                    "on the task for a minute and reports it before and after training.",
        epilog="examples:\n  moelab eval passkey runs/tiny --lengths 64,128,249 --depths 0,0.5,1 --trials 20 --out pk/\n"
               "  moelab eval passkey --quick --out runs/passkey_quick   # the task and the metric shown right")
    q.add_argument("source", nargs="?", help="a moelab run, checkpoint or model directory, or an HF directory")
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
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--json", action="store_true", help="print result.json to stdout")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_passkey)

    c = ev.add_parser(
        "context", help="perplexity against context length on held-out text (line plot)", formatter_class=formatter,
        description="Cut held-out documents into windows of max(--lengths) tokens, take the loss of every token "
                    "given the tokens before it in its window, and report perplexity by context length: per "
                    "bucket between consecutive lengths and for whole windows of each length. Writes result.json, "
                    "report.md/.html and plots/perplexity_vs_context.png into --out.",
        epilog="examples:\n  moelab eval context runs/tiny --lengths 16,32,64,128,256 --out runs/tiny/context\n"
               "  moelab eval context path/to/hf-model --data notes.txt --lengths 128,512,2048 --out ctx/")
    c.add_argument("source", help="a moelab run, checkpoint or model directory, or an HF directory")
    c.add_argument("--lengths", required=True, help="context lengths in tokens, e.g. 64,128,256")
    c.add_argument("--data", default="builtin",
                   help="builtin (the built-in corpus's validation split), a .txt, .jsonl or a directory")
    c.add_argument("--max-windows", type=int, default=512, help="windows to evaluate, spread over documents")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--json", action="store_true", help="print result.json to stdout")
    c.add_argument("--no-progress", action="store_true")
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
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    g = result["grid"]
    print(f"passkey retrieval of {result['source']} ({result['trials']} trials per cell), accuracy by length:")
    print("  " + "  ".join(f"{n}: {a:.2f}" for n, a in zip(g["lengths"], g["by_length"])) + f"  (all {g['overall']:.2f})")
    if "untrained" in result:
        print(f"untrained, same initialisation: {result['untrained']['overall']:.2f}; "
              f"trained {result['quick']['steps']} steps in {result['quick']['train_seconds']:.0f} s")
    print(f"report: {args.out}/report.md")
    return 0


def cmd_context(args) -> int:
    from moelab.eval import eval_context

    lengths = _numbers("--lengths", args.lengths, int)
    result = eval_context(args.source, args.out, lengths, args.data, args.max_windows, args.batch_size,
                          progress=not args.no_progress)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"perplexity of {result['source']} by context length ({result['windows']} windows of "
          f"{result['window']} tokens):")
    print("  " + "  ".join(f"{r['length']}: {r['bucket_ppl']:.2f}" for r in result["rows"]))
    print(f"report: {args.out}/report.md")
    return 0
