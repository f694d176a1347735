"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", §3).

S = softmax(X W_g) over experts, (T, E). Each expert takes the C tokens with the highest score for
it: G, I = TopK(S^T, C) (top-C along tokens), and token t's output is sum over (e, j) with
I[e, j] = t of G[e, j] * FFN_e(x_t). Every expert gets exactly C tokens (balanced by construction,
no aux loss needed); a token gets 0..E experts, 0 meaning its output is the residual alone.

Capacity: C = ceil(capacity_factor * T * top_k / E) (the same formula as token-choice capacity),
capped at T; ``capacity_factor`` None means 1.0. On average a token then uses top_k *
capacity_factor experts (Zhou's "EC-CF2" = top_k 2, capacity_factor 1.0), which is what the
active-parameter count uses, rounded.

NOTE causality leak: the top-C over tokens compares a token with every other token of the batch,
future positions included, so a token's routing depends on tokens after it. Training is fine, but
an autoregressive model cannot do that at generation time. moelab's rule
(``RouterConfig.expert_choice_eval``):
- "topk" (default): in eval mode (``model.eval()``: validation and generation) every token uses
  causal token-choice top-k with k = top_k over the same softmax S, gates = the raw S values
  (the values expert choice would have used as G). Eval loss is therefore measured causally.
- "batch": eval uses expert choice over the batch as in training; non-causal, documented as such.
  With a KV cache it is refused (``check_incremental``): a decoding step holds one token, so the
  capacity is 1 and every expert takes that token (at E=4, top_k=2 the prefill gives 2 experts per
  token and each cached step 4), and no rule can make cached steps equal the full forward, whose
  choices depend on tokens that do not exist yet at decoding time.

Shape legend: T tokens, E experts, C capacity per expert, A assignments (E*C).
"""

from __future__ import annotations

import math

import torch

from moelab.errors import ConfigError
from moelab.moe.routers.base import Router, register_router
from moelab.moe.routing import Routing


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    @property
    def capacity_factor(self) -> float:
        return 1.0 if self.cfg.capacity_factor is None else self.cfg.capacity_factor

    @property
    def active_experts_per_token(self) -> int:
        """top_k * capacity_factor experts per token on average, rounded half up, in [1, E]."""
        return min(self.num_experts, max(1, math.floor(self.cfg.top_k * self.capacity_factor + 0.5)))

    def capacity(self, num_tokens: int) -> int:
        """C = ceil(capacity_factor * T * top_k / E), at most T."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens * self.cfg.top_k / self.num_experts))

    def check_incremental(self) -> None:
        if self.training or self.cfg.expert_choice_eval == "batch":
            mode = "training mode" if self.training else "moe.router.expert_choice_eval=batch"
            raise ConfigError("moe.router.expert_choice_eval", "batch" if not self.training else "training mode",
                              f"expert choice over the batch ({mode}) sees future tokens and cannot decode with "
                              "a KV cache; use model.eval() with expert_choice_eval=topk (the causal token-choice "
                              "fallback), or generate without a cache")

    def route(self, logits_TE: torch.Tensor) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        if not self.training and self.cfg.expert_choice_eval == "topk":
            weight_TK, topk_idx_TK = probs_TE.topk(self.cfg.top_k, dim=-1)  # causal fallback
            return Routing.from_topk(topk_idx_TK, weight_TK, logits_TE, probs_TE)
        T, E = probs_TE.shape
        C = self.capacity(T)
        gate_EC, token_EC = probs_TE.t().topk(C, dim=-1)  # each expert's top-C tokens
        expert_A = torch.arange(E, device=logits_TE.device).repeat_interleave(C)  # (E*C,)
        token_A, gate_A = token_EC.reshape(-1), gate_EC.reshape(-1)
        # token-major, each token's experts by descending gate: the Routing choice-order invariant
        order_A = torch.argsort(-gate_A.detach(), stable=True)
        order_A = order_A[torch.argsort(token_A[order_A], stable=True)]
        return Routing(token_A[order_A], expert_A[order_A], gate_A[order_A], logits_TE, probs_TE, num_experts=E)
