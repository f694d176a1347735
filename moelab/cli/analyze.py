"""`moelab analyze SOURCE`: the routing and expert analyses of the seed papers in one report."""

from __future__ import annotations

import json


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError as e:
        from moelab.errors import ConfigError

        raise ConfigError("--layers", text, "give block indices of MoE layers, e.g. --layers 1,3") from e


def register(sub, formatter) -> None:
    p = sub.add_parser(
        "analyze", help="routing and expert analyses of a trained MoE (one HTML report)", formatter_class=formatter,
        description="Run SOURCE over labelled text with a routing recorder and write analysis.json (every number), "
                    "report.html (self-contained) and figures/ into --out: expert load per domain, consecutive-token "
                    "repetition, token view, token-id specialisation, drops by position, expert similarity, router "
                    "vs output norm, routing over training.",
        epilog="examples:\n  moelab analyze runs/tiny --out runs/tiny/analysis\n"
               "  moelab analyze path/to/OLMoE-hf --data corpus.jsonl --max-tokens 20000 --layers 0,7,15 --out an/")
    p.add_argument("source", help="a moelab run, checkpoint or model directory, or an HF checkpoint directory")
    p.add_argument("--data", default="builtin", help="builtin, a .jsonl (text, domain), a .txt file or a directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-tokens", type=int, default=100_000, help="real tokens to analyse")
    p.add_argument("--layers", help="MoE layers (block indices) to analyse, e.g. 0,3 (default: all)")
    p.add_argument("--seq-len", type=int, help="window length (default: min(max_seq_len, 256))")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-expert-outputs", action="store_true",
                   help="skip running every expert on every token (no output similarity, no router-vs-norm)")
    p.add_argument("--output-similarity", default="angular", choices=("angular", "cosine"),
                   help="expert output similarity: 1 - arccos(cos)/pi as A Closer Look's heat maps (orthogonal = "
                        "0.5), or the cosine (orthogonal = 0)")
    p.add_argument("--min-count", type=int, default=128,
                   help="occurrences a token id or position needs to count in token specialisation and routing "
                        "spread (OpenMoE's 128)")
    p.add_argument("--neuron-matching", action="store_true", help="also the Hungarian neuron-matched similarity")
    p.add_argument("--view-layer", type=int, help="layer of the token view (default: the middle MoE layer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print analysis.json to stdout")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from moelab.analysis import analyze

    result = analyze(args.source, args.out, data=args.data, max_tokens=args.max_tokens, layers=_layers(args.layers),
                     seq_len=args.seq_len, batch_size=args.batch_size, expert_outputs=not args.no_expert_outputs,
                     neuron_matching=args.neuron_matching, view_layer=args.view_layer,
                     progress=not args.no_progress, seed=args.seed, output_similarity=args.output_similarity,
                     min_count=args.min_count)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"analysed {result['tokens']:,} tokens in {result['seconds']:.1f} s; report: {result['report']}")
    return 0
