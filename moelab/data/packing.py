"""Pack documents into fixed-length rows, keeping the domain of every token.

Shapes: N rows, S = seq_len. The token stream is ``doc_0 + [eos] + doc_1 + [eos] + ...`` in the
given order (the corpus is already in a seeded order), cut into rows of S; the last row is padded.
Every token of the stream appears exactly once; nothing is dropped or repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moelab.data.corpus import Corpus
from moelab.data.document import Document
from moelab.data.tokenizer import Tokenizer
from moelab.errors import ConfigError, DataError

IGNORE_INDEX = -100  # label of padding, as in torch.nn.functional.cross_entropy / HF
PAD_DOMAIN = -1


@dataclass
class PackedData:
    """Rows of packed tokens.

    ``labels`` equal ``input_ids`` (the model shifts inside, HF style) except -100 on padding.
    ``domain_ids[n, s]`` is the domain (index into ``domains``) of token ``input_ids[n, s]``; the eos
    ending a document carries that document's domain. For per-domain loss, the domain of the token
    *predicted* at position s is ``domain_ids[n, s + 1]``.
    """

    input_ids: torch.Tensor   # (N, S) int64; padding holds eos_id
    labels: torch.Tensor      # (N, S) int64; -100 on padding
    domain_ids: torch.Tensor  # (N, S) int64; -1 on padding
    domains: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int((self.labels != IGNORE_INDEX).sum())

    def tokens_per_domain(self) -> dict[str, int]:
        counts = torch.bincount(self.domain_ids[self.domain_ids >= 0], minlength=len(self.domains))
        return {d: int(c) for d, c in zip(self.domains, counts)}


def pack(docs: list[Document], tokenizer: Tokenizer, seq_len: int, domains: list[str] | None = None) -> PackedData:
    """Concatenate each document's tokens + [eos] in order and cut into rows of ``seq_len``.

    ``domains`` fixes the domain indices (pass the corpus's, so train and val agree); by default the
    sorted domains of ``docs``.
    """
    if seq_len < 1:
        raise ConfigError("seq_len", seq_len, "must be a positive number of tokens")
    if domains is None:
        domains = sorted({d.domain for d in docs})
    index = {name: i for i, name in enumerate(domains)}
    missing = sorted({d.domain for d in docs} - index.keys())
    if missing:
        raise DataError(f"documents have domain(s) {missing} not in domains={domains}; "
                        "pass the corpus's domains (corpus.domains)")
    ids_per_doc = tokenizer.encode_batch([d.text for d in docs]) if docs else []
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    parts = [p for ids in ids_per_doc for p in (np.asarray(ids, dtype=np.int64), eos)]
    stream_L = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    lengths = np.array([len(ids) + 1 for ids in ids_per_doc], dtype=np.int64)
    domain_L = np.repeat(np.array([index[d.domain] for d in docs], dtype=np.int64), lengths)

    L = stream_L.shape[0]
    N = -(-L // seq_len)
    pad = N * seq_len - L
    input_ids = np.concatenate([stream_L, np.full(pad, tokenizer.eos_id, dtype=np.int64)])
    labels = np.concatenate([stream_L, np.full(pad, IGNORE_INDEX, dtype=np.int64)])
    domain_ids = np.concatenate([domain_L, np.full(pad, PAD_DOMAIN, dtype=np.int64)])
    return PackedData(
        input_ids=torch.from_numpy(input_ids).view(N, seq_len),
        labels=torch.from_numpy(labels).view(N, seq_len),
        domain_ids=torch.from_numpy(domain_ids).view(N, seq_len),
        domains=list(domains),
    )


def prepare_data(corpus: Corpus, tokenizer: Tokenizer, seq_len: int) -> tuple[PackedData, PackedData]:
    """(train, val) packed with the corpus's domain indices.

    Not cached on disk: tokenizing the ~3 MB built-in corpus takes about a second.
    """
    return (pack(corpus.train, tokenizer, seq_len, corpus.domains),
            pack(corpus.val, tokenizer, seq_len, corpus.domains))
