"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention" §4.2; Mixtral paper §3).

A prompt is an instruction, filler text ("The grass is green. ...") repeated, a needle sentence
("The pass key is 12345. Remember it. 12345 is the pass key.") inserted at a chosen depth, and the
question "What is the pass key? The pass key is". The model must continue with the digits; a trial is
correct when the digit run it writes first is exactly the key (:func:`score_continuation`).

NOTE: prompts are built in token space. Each piece (instruction, filler sentence cycle, the needle's
three parts, the key, the question) is encoded once with the model's own tokenizer and the ids are
concatenated, so the prompt has exactly the requested number of tokens and the key's tokens sit at a
known index. The filler is cut at a token boundary (Landmark Attention cuts its filler by characters),
so the text around the needle can end mid-word; ``decode(ids)`` is the text the model reads.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from moelab.errors import ConfigError

# Landmark Attention's prompt (their run_test.py), with its filler sentence cycle.
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = (" The pass key is", ". Remember it.", " is the pass key.")  # the key goes between the parts
QUESTION = " What is the pass key? The pass key is"
DIGITS = 5  # keys from 10000 to 99999


@dataclass(frozen=True)
class PasskeyPrompt:
    """One trial. Token indices are 0-based positions in ``ids``."""

    ids: list[int]  # the prompt, exactly the requested length
    key: str  # the digits to retrieve
    key_index: int  # first token of the key's first occurrence (inside the needle)
    needle_start: int  # first token of the needle sentence
    needle_end: int  # one past its last token
    answer_ids: list[int]  # the key as the model should continue: tokens of " " + key
    depth: float  # the requested depth
    realised_depth: float  # (needle_start - filler start) / filler tokens: within 1 / (2 * filler) of depth

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PromptPieces:
    """The token ids of each piece of a passkey prompt, for one tokenizer (encode once, build many)."""

    prefix: list[int]  # the tokenizer's own leading special tokens (e.g. Llama's <s>) + the intro
    filler: list[int]  # one filler cycle
    needle: tuple[list[int], list[int], list[int]]
    question: list[int]

    def fixed_tokens(self, key_tokens: int) -> int:
        """Tokens of a prompt that are not filler, for a key of ``key_tokens`` tokens."""
        return len(self.prefix) + sum(map(len, self.needle)) + 2 * key_tokens + len(self.question)


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text (Llama's BOS; none for moelab's BPE)."""
    plain, full = tokenizer.encode("x"), tokenizer.encode("x", add_special_tokens=True)
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


def prompt_pieces(tokenizer, intro: bool = False) -> PromptPieces:
    prefix = leading_special_ids(tokenizer) + (tokenizer.encode(INTRO) if intro else [])
    return PromptPieces(prefix=prefix, filler=tokenizer.encode(FILLER),
                        needle=tuple(tokenizer.encode(p) for p in NEEDLE), question=tokenizer.encode(QUESTION))


def key_ids(tokenizer, key: str) -> list[int]:
    return tokenizer.encode(" " + key)


def random_key(rng: random.Random, digits: int = DIGITS) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def min_length(pieces: PromptPieces, digits: int = DIGITS) -> int:
    """A prompt length every key of ``digits`` digits fits in (no filler left at the worst case: the key
    encoded as a space and one token per digit)."""
    return pieces.fixed_tokens(digits + 1)


def make_prompt(tokenizer, length: int, depth: float, key: str, pieces: PromptPieces | None = None
                ) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens with the needle at ``depth`` of the filler.

    depth 0 puts the needle right after the intro, depth 1 right before the question; in between the
    needle starts after ``round(depth * F)`` of the F filler tokens. The filler after the needle
    continues the same cycle (one stream cut in two)."""
    if not 0.0 <= depth <= 1.0:
        raise ConfigError("--depths", depth, "a depth is a fraction of the context: give values in [0, 1]")
    if not key.isdigit():
        raise ConfigError("key", key, "a pass key is a string of digits")
    p = pieces or prompt_pieces(tokenizer)
    kid = key_ids(tokenizer, key)
    n_filler = length - p.fixed_tokens(len(kid))
    if n_filler < 0:
        raise ConfigError("--lengths", length, f"too short for the passkey prompt: the intro, needle and question "
                                               f"alone take {p.fixed_tokens(len(kid))} tokens of this tokenizer")
    reps = n_filler // max(len(p.filler), 1) + 1
    stream = (p.filler * reps)[:n_filler]
    before = round(depth * n_filler)
    a, b, c = p.needle
    needle = a + kid + b + kid + c
    ids = p.prefix + stream[:before] + needle + stream[before:] + p.question
    start = len(p.prefix) + before
    assert len(ids) == length, (len(ids), length)  # exact by construction
    return PasskeyPrompt(ids=ids, key=key, key_index=start + len(a), needle_start=start,
                         needle_end=start + len(needle), answer_ids=kid, depth=depth,
                         realised_depth=before / n_filler if n_filler else depth)


def make_prompts(tokenizer, length: int, depth: float, trials: int, seed: int, digits: int = DIGITS,
                 pieces: PromptPieces | None = None) -> list[PasskeyPrompt]:
    """``trials`` prompts with random keys; the keys depend only on (seed, length, depth, trial)."""
    pieces = pieces or prompt_pieces(tokenizer)
    rng = random.Random(f"passkey:{seed}:{length}:{depth}")
    return [make_prompt(tokenizer, length, depth, random_key(rng, digits), pieces) for _ in range(trials)]


_DIGITS_RE = re.compile(r"\s*(\d+)")


def score_continuation(text: str, key: str) -> bool:
    """Exact retrieval: after optional whitespace, the continuation's first run of digits is the key
    (" 12345." and " 12345" are right; " 1234", " 123456", "key 12345" and "" are wrong)."""
    m = _DIGITS_RE.match(text)
    return bool(m) and m.group(1) == key


def answer_budget(digits: int = DIGITS) -> int:
    """New tokens to decode: room for a space and one token per digit, plus one to see the key end."""
    return digits + 2
