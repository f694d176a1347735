"""Causal self-attention: MHA / GQA / MQA, optional sliding window, q/k norm, clip_qkv, logit soft-cap.

Shape legend: B batch, T query positions, S key positions (cache + new), H query heads,
G kv heads, Dh head dim, D model dim.

NOTE: the plain causal path uses ``F.scaled_dot_product_attention(is_causal=True)``; a sliding
window, a KV cache with earlier positions, padding, or a soft-cap need an explicit mask, so those take
the masked path (same math, checked against each other in tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig
from moelab.layers.norm import RMSNorm
from moelab.layers.kv_cache import KVCache, LayerKVCache, RollingKVCache  # noqa: F401  (re-exported)
from moelab.layers.rope import apply_rope


def causal_mask(q_pos_T: torch.Tensor, k_pos_S: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (T, S), True where query i may attend key j: j <= i and i - j < window (key
    positions < 0 are empty cache slots)."""
    diff_TS = q_pos_T[:, None] - k_pos_S[None, :]
    mask = (diff_TS >= 0) & (k_pos_S[None, :] >= 0)
    if window is not None:
        mask &= diff_TS < window
    return mask


def attention_mask(q_pos_T: torch.Tensor, k_pos_S: torch.Tensor, window: int | None,
                   k_valid_BS: torch.Tensor | None) -> torch.Tensor:
    """(T, S), or (B, 1, T, S) with padding: the causal / window mask, padded keys removed. A query
    left with no key (a left-pad position) keeps its own key, so its softmax stays finite; its
    output is never used. Callers pass ``k_valid_BS=None`` when nothing is padded (no mask work)."""
    mask_TS = causal_mask(q_pos_T, k_pos_S, window)
    if k_valid_BS is None:
        return mask_TS
    mask_BTS = mask_TS[None] & k_valid_BS[:, None, :]
    own_TS = q_pos_T[:, None] == k_pos_S[None, :]
    mask_BTS = mask_BTS | (own_TS[None] & ~mask_BTS.any(-1, keepdim=True))
    return mask_BTS[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        a = cfg.attention
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.kv_heads, cfg.head_dim
        self.window, self.clip, self.softcap = cfg.layer_window(layer_idx), a.clip_qkv, a.logit_softcap
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=a.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=a.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=a.out_bias)
        self.qk_norm = a.qk_norm
        if a.qk_norm == "per_head":  # Qwen3: RMSNorm over each head's Dh
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)
        elif a.qk_norm == "full":  # OLMoE: RMSNorm over all heads at once, before the head split
            self.q_norm = RMSNorm(self.num_heads * hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * hd, cfg.norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_TD: torch.Tensor,
        sin_TD: torch.Tensor,
        positions_T: torch.Tensor,
        cache: LayerKVCache | RollingKVCache | None = None,
        valid_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``positions_T``: the new tokens' indices in the (padded) sequence, for the masks; RoPE
        positions are already in ``cos_TD`` / ``sin_TD`` ((T, Dh), or (B, T, Dh) per row).
        ``valid_BT``: False at padding (never attended to)."""
        B, T, _ = x_BTD.shape
        H, G, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)  # (B, T, H*Dh), (B, T, G*Dh) x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:  # OLMoE clamps after its q/k norm; DBRX has no q/k norm
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q_BHTD = q.view(B, T, H, Dh).transpose(1, 2)
        k_BGTD = k.view(B, T, G, Dh).transpose(1, 2)
        v_BGTD = v.view(B, T, G, Dh).transpose(1, 2)
        if self.qk_norm == "per_head":
            q_BHTD, k_BGTD = self.q_norm(q_BHTD), self.k_norm(k_BGTD)
        q_BHTD, k_BGTD = apply_rope(q_BHTD, cos_TD, sin_TD), apply_rope(k_BGTD, cos_TD, sin_TD)

        if cache is not None:
            k_BGSD, v_BGSD, k_pos_S, k_valid_BS = cache.update(k_BGTD, v_BGTD, valid_BT)
        else:
            k_BGSD, v_BGSD, k_pos_S, k_valid_BS = k_BGTD, v_BGTD, positions_T, valid_BT
        S = k_BGSD.shape[2]
        if G != H:  # GQA / MQA: each kv head serves H / G query heads
            k_BGSD = k_BGSD.repeat_interleave(H // G, dim=1)
            v_BGSD = v_BGSD.repeat_interleave(H // G, dim=1)

        padded = k_valid_BS is not None and not bool(k_valid_BS.all())
        # S == T: keys are exactly the new tokens (no cache, or an empty full cache)
        simple = self.softcap is None and not padded and S == T and (self.window is None or self.window >= T)
        if simple:  # the common training path
            o_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSD, is_causal=True)
        else:
            mask = attention_mask(positions_T, k_pos_S.to(positions_T.device), self.window,
                                  k_valid_BS if padded else None)
            if self.softcap is None:
                o_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSD, attn_mask=mask)
            else:  # Grok-1: soft-cap the logits, which SDPA cannot do
                scores = (q_BHTD.float() @ k_BGSD.float().transpose(-1, -2)) / Dh**0.5  # (B, H, T, S)
                scores = self.softcap * torch.tanh(scores / self.softcap)
                scores = scores.masked_fill(~mask, float("-inf"))
                o_BHTD = (scores.softmax(-1) @ v_BGSD.float()).to(q_BHTD.dtype)
        return self.o_proj(o_BHTD.transpose(1, 2).reshape(B, T, H * Dh))
