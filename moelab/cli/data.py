"""`moelab data ...`: corpus statistics (registered into the parser by moelab.cli.build_parser)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_data_info(args: argparse.Namespace) -> int:
    from moelab.fileio import write_atomic
    from moelab.data.stats import SPLITS, data_info, markdown_table

    info, tokenizer = data_info(args.source, vocab_size=args.vocab_size, seed=args.seed, cache_dir=args.cache_dir)
    if args.out:
        out = Path(args.out)
        write_atomic(out / "result.json", json.dumps(info, indent=2) + "\n")
        write_atomic(out / "data_info.md", markdown_table(info))
        tokenizer.save(out)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"corpus {info['source']}: {len(info['domains'])} domains, byte-level BPE vocabulary {info['vocab_size']}")
    print(f"  {'split':<7}{'domain':<12}{'documents':>11}{'characters':>14}{'tokens':>12}{'chars/token':>13}")
    for split in SPLITS:
        for domain, s in info["splits"][split].items():
            cpt = s["characters"] / s["tokens"] if s["tokens"] else 0.0
            print(f"  {split:<7}{domain:<12}{s['documents']:>11,}{s['characters']:>14,}{s['tokens']:>12,}{cpt:>13.2f}")
    print(f"unigram entropy of the training tokens: {info['unigram_entropy_nats']:.4f} nats "
          f"= {info['unigram_entropy_bits']:.4f} bits per token")
    if args.out:
        print(f"wrote {Path(args.out) / 'result.json'}, data_info.md and tokenizer.json")
    return 0


def register(sub: argparse._SubParsersAction, formatter: type) -> None:
    """Add `moelab data info` to the top-level subparsers."""
    p = sub.add_parser("data", help="inspect the built-in corpus or your own data", formatter_class=formatter,
                       description="Corpora: the built-in code/math/prose corpus or your files.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser(
        "info", help="documents, characters and tokens per domain and split; unigram entropy",
        formatter_class=formatter,
        description="Load a corpus, train a byte-level BPE tokenizer on its training split and count\n"
                    "documents, characters and tokens (one end-of-document token per document included)\n"
                    "per domain and split, plus the unigram entropy of the training tokens: the loss of\n"
                    "the best model that ignores context.",
        epilog="examples:\n  moelab data info\n  moelab data info my_texts/ --vocab-size 4096 --json\n"
               "  moelab data info corpus.jsonl --out runs/data")
    q.add_argument("source", nargs="?", default="builtin",
                   help="'builtin', a text file, a directory of text files, or a .jsonl file with a "
                        "'text' field (and optional 'domain')")
    q.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    q.add_argument("--seed", type=int, default=0, help="orders documents and generates the math domain")
    q.add_argument("--cache-dir", default=None,
                   help="where the built-in corpus is cached (None: $MOELAB_CACHE or ~/.cache/moelab)")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.add_argument("--out", help="also write result.json, data_info.md and tokenizer.json into this directory")
    q.set_defaults(func=cmd_data_info)
