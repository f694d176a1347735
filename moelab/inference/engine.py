"""Batched generation: prompts of different lengths left-padded into one batch with an attention
mask, per-sequence stop tokens and stop strings, greedy / temperature / top-k / top-p sampling with a
seed, streaming text as it is produced, per-token log-probabilities, chunked prefill and an optional
rolling-buffer cache for sliding-window layers.

Padding is masked everywhere: it is never attended to and never routed (see
``MoETransformer.forward(attention_mask=...)``), and positions count real tokens only, so every row
computes what its prompt alone would (tested token for token against single-sequence decoding); with
sampling and a seed every row draws from its own generator (all seeded with the seed), so the same
holds for sampled rows.
A row that has stopped feeds padding from then on, so it takes no expert capacity either.

Shape legend: B batch, T positions, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moelab.errors import ConfigError
from moelab.inference.generate import check_sampling, require_dropless, sample_next
from moelab.model import MoETransformer

FINISH_REASONS = ("stop_token", "stop_string", "length", "context")


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated; a stop token that ended the row included
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the model (temperature 1, unfiltered)
    text: str | None = None  # the generated text (with a tokenizer), cut right before a stop string
    finish_reason: str = "length"  # one of FINISH_REASONS

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "logprobs": self.logprobs,
                "text": self.text, "finish_reason": self.finish_reason}


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still be the start of a stop string (or an
    incomplete UTF-8 character): streaming waits for them."""
    n = len(text) - len(text.rstrip("\ufffd"))  # a character split across byte tokens decodes to U+FFFD
    safe, k_max = text[:len(text) - n], 0  # the stop check runs on the text before it: "b" + "\ufffd" may be "bé"
    for s in stops:
        for k in range(min(len(s) - 1, len(safe)), 0, -1):
            if safe.endswith(s[:k]):
                k_max = max(k_max, k)
                break
    return n + k_max


def _check(model: MoETransformer, prompts: list[list[int]], max_new_tokens: int, stop_strings: Sequence[str],
           tokenizer, prefill_chunk: int | None, stream) -> None:
    if not prompts:
        raise ConfigError("prompts", [], "give at least one prompt")
    limit = model.config.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompts[{i}]", "empty", "a prompt needs at least one token (an empty string encodes "
                                                        "to none; start it with the tokenizer's eos token)")
        if len(p) >= limit:
            raise ConfigError(f"prompts[{i}]", f"{len(p)} tokens", f"longer than the model's context "
                                                                    f"(max_seq_len={limit}) leaves no room to generate")
    if max_new_tokens <= 0:
        raise ConfigError("max_new_tokens", max_new_tokens, "must be a positive integer")
    if stop_strings and tokenizer is None:
        raise ConfigError("stop_strings", list(stop_strings), "stop strings are matched on text: pass the tokenizer")
    if any(not s for s in stop_strings):
        raise ConfigError("stop_strings", list(stop_strings), "an empty stop string would stop at once; remove it")
    if stream is not None and tokenizer is None:
        raise ConfigError("stream", "set", "streaming emits text: pass the tokenizer")
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise ConfigError("prefill_chunk", prefill_chunk, "must be a positive number of tokens (None: one pass)")
    require_dropless(model, "with an eval capacity the rows of a batch compete for expert slots, so a row's "
                            "output depends on its batch mates and padding")


@torch.no_grad()
def generate_batch(model: MoETransformer, prompts: Sequence[Sequence[int] | str], max_new_tokens: int = 64, *,
                   tokenizer=None, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, stop_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                   stream: Callable[[int, str], None] | None = None, prefill_chunk: int | None = None,
                   rolling_cache: bool = False, pad_id: int = 0) -> list[Completion]:
    """Continue every prompt (token ids, or strings with ``tokenizer``) by up to ``max_new_tokens``.

    ``stop_ids`` (default: the tokenizer's eos) end a row when sampled; ``stop_strings`` end it when
    its text contains one (the text is cut right before it). ``stream(row, text)`` receives each
    row's new text as soon as it is certain (held back while it could still become a stop string or
    an unfinished UTF-8 character, flushed when the row ends whatever its finish reason): the pieces
    add up to ``text``. ``prefill_chunk``: run prompts through the cache that many tokens at a time.
    ``rolling_cache``: sliding-window layers keep only their window (constant memory).
    A batch shares one cache index: every row can generate max_seq_len - (longest prompt) tokens
    (finish_reason "context" when that cut a row short). ``token_ids`` and ``logprobs`` keep the
    token that completed a stop string; ``text`` ends before the string. Dropless eval routing only
    (``moe.router.eval_capacity_factor`` null): with a capacity rows compete for expert slots."""
    model.eval()
    if any(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ConfigError("prompts", "text", "text prompts need the tokenizer (pass tokenizer=...)")
        prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    prompts = [list(p) for p in prompts]
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    _check(model, prompts, max_new_tokens, stop_strings, tokenizer, prefill_chunk, stream)
    if stop_ids is None:
        stop_ids = [tokenizer.eos_id] if tokenizer is not None else []
    stops = set(stop_ids)
    dev = next(model.parameters()).device
    B, T0 = len(prompts), max(len(p) for p in prompts)
    ids_BT = torch.full((B, T0), pad_id, dtype=torch.long, device=dev)
    mask_BT = torch.zeros(B, T0, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):  # left padding
        ids_BT[b, T0 - len(p):] = torch.tensor(p, device=dev)
        mask_BT[b, T0 - len(p):] = 1
    # every row its own generator with the same seed: a row samples what its prompt alone would, whatever
    # else is in the batch (a shared generator would hand each row draws that depend on the rows before it)
    generator = [torch.Generator(device=dev).manual_seed(seed) for _ in range(B)] if seed is not None else None
    cache = model.new_cache(rolling=rolling_cache)
    chunk = prefill_chunk or T0
    # without any padding the mask is left out: no mask work and no host sync per layer and step
    padded = any(len(p) < T0 for p in prompts)
    for a in range(0, T0, chunk):
        out = model(ids_BT[:, a:a + chunk], cache=cache, attention_mask=mask_BT[:, :a + chunk] if padded else None)
    logits_BV = out.logits[:, -1]
    done = [Completion(p) for p in prompts]
    active = [True] * B
    streamed = [0] * B
    steps = min(max_new_tokens, model.config.max_seq_len - T0)
    for step in range(steps):
        token_B = sample_next(logits_BV, temperature, top_k, top_p, generator)
        logp_B = torch.log_softmax(logits_BV.float(), dim=-1).gather(1, token_B[:, None])[:, 0]
        tokens, logps = token_B.tolist(), logp_B.tolist()
        for b in range(B):
            if not active[b]:
                continue
            c = done[b]
            c.token_ids.append(tokens[b])
            c.logprobs.append(logps[b])
            if tokens[b] in stops:
                active[b], c.finish_reason = False, "stop_token"
            if tokenizer is not None:
                text = tokenizer.decode([t for t in c.token_ids if t not in stops])
                hit = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
                if hit >= 0:
                    text, active[b], c.finish_reason = text[:hit], False, "stop_string"
                c.text = text
                if stream is not None:  # a row's last step (any finish reason) flushes what was held back
                    last = not active[b] or step == steps - 1
                    upto = len(text) if last else len(text) - _held_back(text, stop_strings)
                    if upto > streamed[b]:
                        stream(b, text[streamed[b]:upto])
                        streamed[b] = upto
        if not any(active) or step == steps - 1:
            break
        # rows that stopped feed padding: masked, so they no longer route or take capacity
        next_BT = torch.tensor([[tokens[b] if active[b] else pad_id] for b in range(B)], device=dev)
        mask_BT = torch.cat([mask_BT, torch.tensor([[int(a)] for a in active], device=dev)], dim=1)
        padded = padded or not all(active)
        logits_BV = model(next_BT, cache=cache, attention_mask=mask_BT if padded else None).logits[:, -1]
    for c, a in zip(done, active):
        # a batch is as long as its longest prompt: every row stops at max_seq_len - T0 new tokens
        if a and len(c.token_ids) < max_new_tokens:
            c.finish_reason = "context"
    return done
