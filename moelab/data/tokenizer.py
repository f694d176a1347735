"""Byte-level BPE (GPT-2 style) trained with the `tokenizers` library.

Byte-level pre-tokenization maps every byte to one of 256 base symbols, so any UTF-8 string
(emoji, CJK, control characters) encodes without an unknown token and decodes back exactly.

NOTE: the literal string ``<|endoftext|>`` inside a text is encoded as ordinary bytes, never as
the end-of-document id (``encode_special_tokens``): only :func:`moelab.data.packing.pack` inserts
``eos_id``, so data cannot forge document boundaries and ``decode(encode(s)) == s`` for every ``s``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moelab.fileio import write_atomic
from moelab.errors import CheckpointError, ConfigError

EOS = "<|endoftext|>"
FILENAME = "tokenizer.json"
# End-of-text tokens of tokenizers trained elsewhere (Hugging Face model directories), tried in order
# when there is no <|endoftext|> and no tokenizer_config.json naming one.
OTHER_EOS = ("</s>", "<|end_of_text|>", "<|im_end|>", "<eos>", "<|eot_id|>")
MIN_VOCAB = 257  # 256 byte symbols + eos


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with moelab's conventions (eos, save/load)."""

    def __init__(self, tok: HFTokenizer, eos_token: str | None = None):
        """``eos_token``: the end-of-text token of a tokenizer trained elsewhere (default: moelab's
        ``<|endoftext|>``, else the first of ``OTHER_EOS`` the vocabulary has)."""
        candidates = (eos_token,) if eos_token else (EOS, *OTHER_EOS)
        eos_id = next((i for i in (tok.token_to_id(c) for c in candidates) if i is not None), None)
        if eos_id is None:
            raise CheckpointError(f"tokenizer has none of the end-of-text tokens {list(candidates)}; train it with "
                                  "moelab.data.train_tokenizer or name its eos_token in tokenizer_config.json")
        tok.encode_special_tokens = True  # see NOTE above
        self._tok = tok
        self.eos_id: int = eos_id
        self.vocab_size: int = tok.get_vocab_size()

    @property
    def backend(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (e.g. for ``transformers.PreTrainedTokenizerFast``)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens=True`` encodes exactly as ``tokenizer.json``
        does by default (its post-processor's BOS/EOS included, e.g. Llama's ``<s>``)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Like ``[encode(t) for t in texts]``, in parallel threads."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; ``eos_id`` decodes to ``<|endoftext|>``."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` is a directory, or a file path ending in .json); atomic."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / FILENAME
        write_atomic(path, self._tok.to_str(pretty=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """From a ``tokenizer.json`` file or a directory holding one (a checkpoint or run directory)."""
        path = Path(path)
        file = path / FILENAME if path.is_dir() else path
        if not file.is_file():
            where = f"directory {path} has no {FILENAME}" if path.is_dir() else f"{file} does not exist"
            raise CheckpointError(f"{where}; point to a checkpoint directory or a tokenizer.json file")
        try:
            text = file.read_text(encoding="utf-8")
            json.loads(text)
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a plain Exception on a malformed file
            raise CheckpointError(f"{file}: not a valid tokenizer file ({str(e).splitlines()[0][:200]}); "
                                  "it may be truncated: copy it again from the run that trained it") from e
        return cls(tok, _hf_eos_token(file.parent / "tokenizer_config.json"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_str() == other.to_str()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _hf_eos_token(config: Path) -> str | None:
    """The ``eos_token`` a Hugging Face ``tokenizer_config.json`` names (a string or {"content": ...})."""
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{config}: not valid JSON ({e})") from e
    return eos.get("content") if isinstance(eos, dict) else eos


def train_tokenizer(texts: Iterable[str], vocab_size: int, seed: int = 0,
                    max_chars: int | None = 20_000_000) -> Tokenizer:
    """Byte-level BPE with ``<|endoftext|>`` (id 0) trained on ``texts``; deterministic.

    The merges depend only on the multiset of pre-tokenized words (ties broken by the pair itself), so
    the same texts give the same tokenizer on every run and thread count. ``seed`` is accepted for a
    uniform API; BPE training has no randomness. Only the first ``max_chars`` characters of
    ``texts`` are used (a deterministic sample, as a corpus's train split is in a seeded order; 20M
    characters train in about 10 s). The result may have fewer than ``vocab_size`` tokens when the
    texts run out of pairs to merge; read ``Tokenizer.vocab_size``.
    """
    del seed
    if vocab_size < MIN_VOCAB:
        raise ConfigError("vocab_size", vocab_size, f"must be >= {MIN_VOCAB} (256 bytes + end-of-document)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=32)
    tok.train_from_iterator(_take_chars(texts, max_chars), trainer=trainer)
    return Tokenizer(tok)


def _take_chars(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    used = 0
    for text in texts:
        if max_chars is not None and used >= max_chars:
            return
        yield text
        used += len(text)
