"""Speculative decoding with DeepSeek-V3's multi-token-prediction module as the drafter (V3 §5.4.3):
greedy output, fewer forwards of the main model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelab.errors import ConfigError
from moelab.inference.generate import require_dropless
from moelab.layers.attention import KVCache
from moelab.model import MoETransformer


@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens proposed by the MTP module
    accepted: int = 0  # of them, equal to the main model's greedy choice
    main_forwards: int = 0  # forwards of the main model after the prompt
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.main_forwards if self.main_forwards else 0.0

    def to_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "main_forwards": self.main_forwards, "new_tokens": self.new_tokens,
                "tokens_per_forward": self.tokens_per_forward}


@torch.no_grad()
def speculative_generate_ids(model: MoETransformer, input_ids: torch.Tensor, max_new_tokens: int,
                             eos_id: int | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy decoding with DeepSeek-V3's MTP module as the drafter (V3 §5.4.3): each step the main
    model verifies [last token, draft] in one forward; a draft equal to its greedy choice is kept
    together with the main model's next token (two tokens for one forward), otherwise the main
    model's token replaces it and the draft's cache entry is dropped. The MTP module only ever sees
    confirmed positions, so its cache never rolls back. The output is plain greedy decoding's up to
    float rounding of a 2-token vs a 1-token forward (exact in the fp32 tests; in bf16 a near-tie can
    flip). Dropless eval routing only; batch size 1."""
    if model.mtp is None:
        raise ConfigError("mtp", None, "speculative decoding drafts with the MTP modules; this model has none "
                                       "(train with model.mtp set, or load a DeepSeek-V3 checkpoint with its MTP layer)")
    if input_ids.shape[0] != 1:
        raise ConfigError("input_ids", tuple(input_ids.shape), "speculative decoding takes one sequence (batch 1)")
    if input_ids.shape[1] == 0:
        raise ConfigError("input_ids", "empty", "give at least one prompt token")
    require_dropless(model, "with an eval capacity a 2-token verification can drop other assignments than 1-token "
                            "decoding; speculative decoding needs dropless eval routing")
    model.eval()
    stats = SpeculativeStats()
    T0 = input_ids.shape[1]
    budget = max(0, min(max_new_tokens, model.config.max_seq_len - T0))
    if budget == 0:
        return input_ids, stats
    cache, mtp_cache = model.new_cache(), KVCache(1)
    out = model(input_ids, cache=cache, return_hidden=True)
    tokens = input_ids[0].tolist()
    tokens.append(int(out.logits[0, -1].argmax()))
    limit = T0 + budget

    def more() -> bool:
        return len(tokens) < limit and not (eos_id is not None and tokens[-1] == eos_id)

    def draft_from(h_BTD: torch.Tensor, next_ids: list[int], start: int) -> int:
        # h_BTD: ModelOutput.hidden, after the final norm, what the MTP module is trained on (and transformers feeds)
        nxt = torch.tensor([next_ids], device=input_ids.device)
        return int(model.mtp_logits(h_BTD, nxt, start, mtp_cache)[0, -1].argmax())

    # MTP pairs (h_i, t_{i+1}) for every prompt position; the last one drafts token T0 + 1
    draft = draft_from(out.hidden, tokens[1:], 0) if more() else None
    while more():
        n = len(tokens)  # tokens known; the main cache holds positions 0 .. n - 2
        if n == limit - 1:  # one token left: a plain step, no draft to verify
            out = model(torch.tensor([[tokens[-1]]], device=input_ids.device), cache=cache)
            stats.main_forwards += 1
            tokens.append(int(out.logits[0, -1].argmax()))
            break
        step_ids = torch.tensor([[tokens[-1], draft]], device=input_ids.device)
        out = model(step_ids, cache=cache, return_hidden=True)  # positions n - 1 and n
        stats.main_forwards += 1
        stats.drafted += 1
        greedy = out.logits[0].argmax(-1).tolist()
        if greedy[0] == draft and not (eos_id is not None and draft == eos_id):
            stats.accepted += 1
            tokens += [draft, greedy[1]]
            pairs = (out.hidden, [draft, greedy[1]])
        else:
            tokens.append(greedy[0])
            cache.truncate(n)  # drop position n, computed for the rejected draft
            pairs = (out.hidden[:, :1], [greedy[0]])
        if more():  # the MTP module only sees confirmed positions: its cache never rolls back
            draft = draft_from(*pairs, n - 1)
    if eos_id is not None and eos_id in tokens[T0:]:
        tokens = tokens[:T0 + tokens[T0:].index(eos_id) + 1]
    tokens = tokens[:limit]
    stats.new_tokens = len(tokens) - T0
    return torch.tensor([tokens], device=input_ids.device), stats
