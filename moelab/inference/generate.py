"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p (nucleus) sampling.

With ``use_cache=True`` the prompt is run once and every new token attends to cached keys/values;
``use_cache=False`` re-runs the whole sequence each step (the reference the cache is tested against).
"""

from __future__ import annotations

import torch

from moelab.errors import ConfigError
from moelab.model import MoETransformer
from moelab.moe.layer import MoELayer


def require_dropless(model: MoETransformer, why: str) -> None:
    """Refuse a model whose MoE layers have an eval capacity (``why``: what it would break), naming the
    config field: decoding that batches rows or verifies several tokens at once needs each token's
    routing to depend on that token alone."""
    for module in model.modules():
        if isinstance(module, MoELayer) and module.router_cfg.eval_capacity_factor is not None:
            raise ConfigError("moe.router.eval_capacity_factor", module.router_cfg.eval_capacity_factor,
                              f"{why}; set it to null for generation")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int | None = None,
                   prefix: str = "") -> None:
    """Refuse sampling settings that would silently mean something else, naming the argument
    (``prefix``: "--" for command-line flags): temperature >= 0 (0 is greedy), top_k None or >= 1,
    top_p None or in (0, 1], max_new_tokens >= 1."""
    import math

    name = (lambda n: prefix + n.replace("_", "-")) if prefix else (lambda n: n)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(name("temperature"), temperature, "must be >= 0 (0 = greedy; 1 samples the model's own "
                                                            "distribution)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(name("top_k"), top_k, "must be >= 1 (the most likely tokens kept per step), or None for no "
                                                "top-k cut" + ("; on the command line: --top-k none" if prefix else ""))
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError(name("top_p"), top_p, "must be in (0, 1] (1 keeps every token)")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ConfigError(name("max_new_tokens"), max_new_tokens, "must be >= 1")


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits; temperature 0 is greedy. ``generator``: one for
    the batch, or a list with one per row (each row then samples as it would alone)."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):  # one generator per row: a row's draws ignore the other rows
        return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g) for b, g in enumerate(generator)])[:, 0]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: MoETransformer, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Append up to ``max_new_tokens`` tokens to ``input_ids`` (B, T); stops early when all rows hit eos."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    model.eval()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    B, T0 = input_ids.shape
    steps = max(0, min(max_new_tokens, model.config.max_seq_len - T0))
    # the output preallocated: a step writes one column (no torch.cat of the whole sequence per
    # token); the only host syncs of a step are the ones sampling needs and, with eos, one check
    out = input_ids.new_empty(B, T0 + steps)
    out[:, :T0] = input_ids
    cache = model.new_cache() if use_cache else None
    next_input = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    n = T0
    for _ in range(steps):
        logits = model(next_input if use_cache else out[:, :n], cache=cache).logits[:, -1]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_id), token)
            finished |= token == eos_id
        out[:, n] = token
        n += 1
        next_input = out[:, n - 1:n]
        if eos_id is not None and bool(finished.all()):
            break
    return out[:, :n]


def generate(model: MoETransformer, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = 0.95, seed: int | None = 0, use_cache: bool = True) -> str:
    """Continue ``prompt`` and return only the generated text."""
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        prompt_ids = [tokenizer.eos_id]
    ids = torch.tensor([prompt_ids])
    out = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.eos_id, use_cache)
    new = [t for t in out[0, len(prompt_ids):].tolist() if t != tokenizer.eos_id]
    return tokenizer.decode(new)
