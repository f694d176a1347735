"""The one routing result every router returns (the routers and their registry are in ``moelab.moe.routers``).

A routing is a list of A (token, expert, weight) assignments. Token-choice top-k gives A = T*K;
expert choice and dynamic top-p give a variable number per token; capacity dropping removes
assignments. Because every router speaks this one form, the MoE layer never branches on router type.
Invariant: a token's assignments appear in its choice order, 1st choice first (capacity priority
counts "1st choices before 2nd choices" from this order, see ``moelab.moe.dispatch``).

Shape legend: T tokens, E experts, A assignments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def count_ids(idx_N: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) long: how often each of 0..n-1 occurs in ``idx_N``. ``torch.bincount`` in eager mode; under
    torch.compile a scatter-add, whose output shape is static (bincount's depends on the data, a graph
    break)."""
    if torch.compiler.is_compiling():
        return torch.zeros(n, dtype=torch.long, device=idx_N.device).index_add_(0, idx_N, torch.ones_like(idx_N))
    return torch.bincount(idx_N, minlength=n)


@dataclass
class TokenLayout:
    """Which sequence and position each routed token is, for the losses, capacity priorities and
    metrics that are defined per sequence. Routed tokens are sequence-major: sequence b's tokens are
    the ``lens[b]`` rows after those of sequences < b. Without padding every sequence has the same
    length (``dense``); with a padding mask only the real tokens are routed (``from_mask``), so a
    pad takes no capacity and counts in no loss, load or bias update."""

    lens: list[int]  # routed tokens per sequence
    _pos_T: torch.Tensor | None = None  # set by from_mask; derived on first use for dense layouts
    _seq_T: torch.Tensor | None = None
    device: torch.device | str | None = None

    @property
    def pos_T(self) -> torch.Tensor:
        """(T,) long, position of each routed token within its sequence (0-based)."""
        if self._pos_T is None:
            self._dense_indices()
        return self._pos_T

    @property
    def seq_T(self) -> torch.Tensor:
        """(T,) long, the sequence of each routed token."""
        if self._seq_T is None:
            self._dense_indices()
        return self._seq_T

    def _dense_indices(self) -> None:
        # dense layouts only: built when a per-sequence loss, position priority or metric asks, so a
        # forward that needs none of them (decoding) pays nothing
        S = self.lens[0] if self.lens else 0
        t = torch.arange(S * len(self.lens), device=self.device)
        self._pos_T, self._seq_T = (t % S, t // S) if S else (t, t)

    @property
    def num_seqs(self) -> int:
        return len(self.lens)

    @property
    def max_len(self) -> int:
        return max(self.lens, default=0)

    @classmethod
    def dense(cls, num_seqs: int, seq_len: int, device=None) -> TokenLayout:
        return cls([seq_len] * num_seqs, device=device)

    @classmethod
    def from_mask(cls, mask_BT: torch.Tensor) -> TokenLayout:
        """Layout of the True positions of a (B, T) mask; a position counts the real tokens before it
        in its row (left padding gives the first real token position 0)."""
        B, T = mask_BT.shape
        pos_BT = mask_BT.long().cumsum(1) - 1
        seq_BT = torch.arange(B, device=mask_BT.device)[:, None].expand(B, T)
        return cls(mask_BT.sum(1).tolist(), pos_BT[mask_BT], seq_BT[mask_BT], mask_BT.device)

    @classmethod
    def of(cls, layout: TokenLayout | int, num_tokens: int, device=None) -> TokenLayout:
        """Accept a layout or a plain sequence length (dense sequences of that length)."""
        if isinstance(layout, TokenLayout):
            return layout
        return cls.dense(max(num_tokens // layout, 1) if num_tokens else 0, layout, device)


@dataclass
class Routing:
    token_idx_A: torch.Tensor  # long, which token each assignment belongs to
    expert_idx_A: torch.Tensor  # long, which expert serves it
    weight_A: torch.Tensor  # fp32 combine weight of the expert's output
    logits_TE: torch.Tensor  # fp32 router logits (after temperature), for z-loss and analysis
    # fp32 distribution over all experts used by the balance losses: the softmax for softmax routers,
    # the sigmoid scores normalised to sum 1 for sigmoid routers (DeepSeek-V3 eq. 19)
    probs_TE: torch.Tensor
    num_experts: int
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted by their coefficients
    scores_TE: torch.Tensor | None = None  # raw affinities when they are not probs_TE (V3: sigmoid)
    # set by the MoE layer when a capacity applies: which assignments survived (bool, (A,))
    kept_A: torch.Tensor | None = None
    # activations computed while scoring that the experts reuse: AoE's x W_down, (T, E, d_low)
    expert_cache_TEL: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.logits_TE.shape[0]

    @classmethod
    def from_topk(cls, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor, logits_TE: torch.Tensor,
                  probs_TE: torch.Tensor) -> Routing:
        T, K = topk_idx_TK.shape
        token_idx_A = torch.arange(T, device=topk_idx_TK.device).repeat_interleave(K)  # (T*K,)
        return cls(token_idx_A, topk_idx_TK.reshape(-1), weight_TK.reshape(-1).float(), logits_TE, probs_TE,
                   num_experts=logits_TE.shape[-1])

    def expert_counts(self) -> torch.Tensor:
        """(E,) number of assignments per expert."""
        return count_ids(self.expert_idx_A, self.num_experts)

    def experts_per_token(self) -> torch.Tensor:
        """(T,) number of experts each token was routed to (0..E for expert choice)."""
        return count_ids(self.token_idx_A, self.num_tokens)

    def select(self, mask_A: torch.Tensor) -> Routing:
        """The routing with only the assignments where ``mask_A`` is true (same order), no losses."""
        return Routing(self.token_idx_A[mask_A], self.expert_idx_A[mask_A], self.weight_A[mask_A], self.logits_TE,
                       self.probs_TE, self.num_experts, scores_TE=self.scores_TE,
                       expert_cache_TEL=self.expert_cache_TEL)
