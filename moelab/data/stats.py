"""Corpus statistics: documents, characters and tokens per domain and split, unigram entropy.

The unigram entropy H = -sum_v p(v) ln p(v) of the training tokens is the cross-entropy of the best
model that ignores context: a language model whose validation loss is not well below it has learned
nothing beyond token frequencies.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moelab.data.corpus import Corpus, load_corpus
from moelab.data.packing import IGNORE_INDEX, PackedData, pack
from moelab.data.tokenizer import MIN_VOCAB, Tokenizer, train_tokenizer
from moelab.errors import ConfigError

SPLITS = ("train", "val")


def unigram_entropy(packed: PackedData) -> float:
    """Entropy in nats of the token frequencies of ``packed`` (padding excluded, eos included)."""
    ids = packed.input_ids[packed.labels != IGNORE_INDEX]
    if ids.numel() == 0:
        return 0.0
    counts = torch.bincount(ids).double()
    p = counts[counts > 0] / ids.numel()
    return float(-(p * p.log()).sum())


def split_stats(packed: PackedData, docs) -> dict[str, dict[str, int]]:
    """{domain: {documents, characters, tokens}} plus ``all``; tokens include one eos per document."""
    tokens = packed.tokens_per_domain()
    out = {}
    for d in packed.domains:
        mine = [doc for doc in docs if doc.domain == d]
        out[d] = {"documents": len(mine), "characters": sum(len(doc.text) for doc in mine), "tokens": tokens[d]}
    out["all"] = {k: sum(v[k] for v in out.values()) for k in ("documents", "characters", "tokens")}
    return out


def corpus_info(corpus: Corpus, tokenizer: Tokenizer) -> dict:
    """Per split and domain counts, and the unigram entropy of the training tokens."""
    train = pack(corpus.train, tokenizer, seq_len=1024, domains=corpus.domains)
    val = pack(corpus.val, tokenizer, seq_len=1024, domains=corpus.domains)
    h = unigram_entropy(train)
    return {
        "domains": corpus.domains,
        "vocab_size": tokenizer.vocab_size,
        "splits": {"train": split_stats(train, corpus.train), "val": split_stats(val, corpus.val)},
        "unigram_entropy_nats": h,
        "unigram_entropy_bits": h / math.log(2),
        "corpus_fingerprint": corpus.fingerprint(),
    }


def data_info(source: str | Path | None = None, vocab_size: int = 2048, seed: int = 0,
              cache_dir: str | Path | None = None) -> tuple[dict, Tokenizer]:
    """What ``moelab data info`` reports: load the corpus, train a tokenizer on its training split."""
    if vocab_size < MIN_VOCAB:  # fail before the corpus is built
        raise ConfigError("vocab_size", vocab_size, f"must be >= {MIN_VOCAB} (256 bytes + end-of-document)")
    corpus = load_corpus(source, cache_dir=cache_dir, seed=seed)
    tokenizer = train_tokenizer((d.text for d in corpus.train), vocab_size, seed=seed)
    info = {"source": "builtin" if source is None else str(source), "seed": seed,
            "requested_vocab_size": vocab_size, **corpus_info(corpus, tokenizer)}
    return info, tokenizer


def markdown_table(info: dict) -> str:
    """The counts of :func:`data_info` as a markdown table."""
    lines = [f"# Corpus `{info['source']}`", "",
             f"Byte-level BPE tokenizer, vocabulary {info['vocab_size']}, trained on the train split. "
             f"Unigram entropy of the training tokens: {info['unigram_entropy_nats']:.4f} nats = "
             f"{info['unigram_entropy_bits']:.4f} bits per token.", "",
             "| split | domain | documents | characters | tokens | characters/token |",
             "|---|---|---:|---:|---:|---:|"]
    for split in SPLITS:
        for domain, s in info["splits"][split].items():
            cpt = s["characters"] / s["tokens"] if s["tokens"] else 0.0
            lines.append(f"| {split} | {domain} | {s['documents']:,} | {s['characters']:,} | {s['tokens']:,} "
                         f"| {cpt:.2f} |")
    return "\n".join(lines) + "\n"
