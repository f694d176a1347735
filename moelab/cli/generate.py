"""`moelab generate`: text from a checkpoint or run (batched engine, streaming, speculative decoding)."""

from __future__ import annotations

import json
import sys

from moelab.errors import ConfigError


def register(sub, formatter) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint or run", formatter_class=formatter,
                       description="Sample continuations with a KV cache; several --prompt run as one left-padded "
                                   "batch.",
                       epilog='examples:\n  moelab generate runs/tiny --prompt "def main(" --max-new-tokens 64\n'
                              '  moelab generate runs/tiny --prompt "def f(" --prompt "The" --stop "\\n\\n" --stream\n'
                              '  moelab generate runs/ds3 --prompt "x = " --speculative   # DeepSeek MTP drafts')
    p.add_argument("checkpoint", help="run directory (latest checkpoint) or checkpoint directory")
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    p.add_argument("--stop", action="append", default=[], type=decode_escapes,
                   help=r"stop string (repeatable); cut from the output. Backslash escapes are decoded: \n, \t, \r, "
                        r"\\, \xHH, \uXXXX (so --stop '\n\n' stops at a blank line)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--prefill-chunk", type=int, help="run long prompts through the cache this many tokens at a time")
    p.add_argument("--rolling-cache", action="store_true",
                   help="sliding-window layers keep only their window in the cache (constant memory)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per prompt (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=_top_k, default=50,
                   help="keep the k most likely tokens per step; 'none' = no cut (default: 50)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1] (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--speculative", action="store_true",
                   help="greedy decoding drafted by the model's MTP module (DeepSeek-V3); prints the acceptance rate "
                        "and the speed-up over plain greedy decoding, timed side by side")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks first (pays off on long outputs: compiling takes ~1 min on CPU)")
    p.add_argument("--json", action="store_true",
                   help='print {"seed", "results": [{"prompt", "text", "finish_reason", "token_ids", "logprobs"}]} '
                        '(one row per --prompt, one prompt or several)')
    p.set_defaults(func=cmd_generate)


_ESCAPE = None


def decode_escapes(text: str) -> str:
    r"""The usual backslash escapes of a command-line string decoded (\n, \t, \r, \\, \0, \xHH,
    \uXXXX, \UXXXXXXXX), everything else (non-ASCII text included) kept as typed: the shell passes
    ``--stop "\n\n"`` as a backslash and an n."""
    import re

    global _ESCAPE
    if _ESCAPE is None:
        _ESCAPE = re.compile(r"\\(?:([ntr0\\'\"])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
    simple = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"'}
    return _ESCAPE.sub(lambda m: simple[m.group(1)] if m.group(1) else chr(int(next(g for g in m.groups()[1:] if g),
                                                                                   16)), text)


def _top_k(text: str) -> int | None:
    if text.lower() in ("none", "off"):
        return None
    return int(text)


def cmd_generate(args) -> int:
    from moelab.inference.generate import check_sampling, generate
    from moelab.loading import load, load_tokenizer

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, prefix="--")  # before loading
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
        print(json.dumps({"seed": args.seed, "results": [{"prompt": args.prompt, "text": text}]}) if args.json
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
        # one shape for one prompt or several; "text" as in Python's Completion.text
        rows = [{"prompt": p, "text": r.text, "finish_reason": r.finish_reason, "token_ids": r.token_ids,
                 "logprobs": r.logprobs} for p, r in zip(prompts, results)]
        print(json.dumps({"seed": args.seed, "results": rows}))
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
    result = {"prompt": args.prompt, "text": tokenizer.decode(new), **stats.to_dict(),
              "same_as_greedy": bool(torch.equal(out, ref)), "median_s": med,
              "speedup": med["greedy"] / med["speculative"]}
    if args.json:
        print(json.dumps(result))
    else:
        sys.stdout.write(args.prompt + result["text"] + "\n")
        print(f"MTP drafts accepted {stats.accepted}/{stats.drafted} ({stats.acceptance_rate:.0%}), "
              f"{stats.tokens_per_forward:.2f} tokens per main-model forward, {result['speedup']:.2f}x plain greedy "
              f"tokens/s (same tokens: {'yes' if result['same_as_greedy'] else 'NO'})")
    return 0
