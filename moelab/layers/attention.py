"""Causal self-attention: MHA / GQA / MQA, optional sliding window, q/k norm, clip_qkv, logit soft-cap.

Shape legend: B batch, T query positions, S key positions (cache + new), H query heads,
G kv heads, Dh head dim, D model dim.

NOTE: the plain causal path uses ``F.scaled_dot_product_attention(is_causal=True)``; a sliding
window, a KV cache with more than one new token, or a soft-cap need an explicit mask, so those take
the masked path (same math, checked against each other in tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig
from moelab.layers.norm import RMSNorm
from moelab.layers.rope import apply_rope


class LayerKVCache:
    """Keys and values of one attention layer, after RoPE, as (B, G, S, Dh), in buffers that grow by
    doubling: appending a step writes into the buffer instead of copying the whole cache (a
    ``torch.cat`` per step is O(S) copying per token, O(S^2) per generation)."""

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, :self.length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, :self.length]

    def update(self, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k_BGTD.shape[2]
        end = self.length + T
        if self._k is None or end > self._k.shape[2] or self._k.shape[0] != k_BGTD.shape[0]:
            cap = max(end, 2 * (0 if self._k is None else self._k.shape[2]), 64)
            k_buf = k_BGTD.new_empty(*k_BGTD.shape[:2], cap, k_BGTD.shape[3])
            v_buf = v_BGTD.new_empty(*v_BGTD.shape[:2], cap, v_BGTD.shape[3])
            if self.length:
                k_buf[:, :, :self.length] = self._k[:, :, :self.length]
                v_buf[:, :, :self.length] = self._v[:, :, :self.length]
            self._k, self._v = k_buf, v_buf
        self._k[:, :, self.length:end] = k_BGTD
        self._v[:, :, self.length:end] = v_BGTD
        self.length = end
        return self.k, self.v


    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative decoding rejects drafted tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length


class KVCache:
    """One LayerKVCache per block; ``seq_len`` is the number of positions already cached.
    Multi-head latent attention stores its latent c_KV as the keys and its RoPE key as the values
    (both (B, 1, S, *)): the same buffers, 576 numbers per token and layer at DeepSeek's sizes."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKVCache() for _ in range(num_layers)]

    @property
    def seq_len(self) -> int:
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)

    def nbytes(self) -> int:
        """Bytes held by the cached positions (not the spare capacity of the buffers)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.k, layer.v) if t is not None)


def causal_mask(q_pos_T: torch.Tensor, k_pos_S: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (T, S), True where query i may attend key j: j <= i and i - j < window."""
    diff_TS = q_pos_T[:, None] - k_pos_S[None, :]
    mask = diff_TS >= 0
    if window is not None:
        mask &= diff_TS < window
    return mask


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
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
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
            k_BGSD, v_BGSD = cache.update(k_BGTD, v_BGTD)
        else:
            k_BGSD, v_BGSD = k_BGTD, v_BGTD
        S = k_BGSD.shape[2]
        if G != H:  # GQA / MQA: each kv head serves H / G query heads
            k_BGSD = k_BGSD.repeat_interleave(H // G, dim=1)
            v_BGSD = v_BGSD.repeat_interleave(H // G, dim=1)

        simple = self.softcap is None and (S == T) and (self.window is None or self.window >= T)
        if simple:  # the common training path
            o_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSD, is_causal=True)
        else:
            k_pos_S = torch.arange(S, device=x_BTD.device) + (positions_T[-1] + 1 - S)
            mask_TS = causal_mask(positions_T, k_pos_S, self.window)
            if self.softcap is None:
                o_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSD, attn_mask=mask_TS)
            else:  # Grok-1: soft-cap the logits, which SDPA cannot do
                scores = (q_BHTD.float() @ k_BGSD.float().transpose(-1, -2)) / Dh**0.5  # (B, H, T, S)
                scores = self.softcap * torch.tanh(scores / self.softcap)
                scores = scores.masked_fill(~mask_TS, float("-inf"))
                o_BHTD = (scores.softmax(-1) @ v_BGSD.float()).to(q_BHTD.dtype)
        return self.o_proj(o_BHTD.transpose(1, 2).reshape(B, T, H * Dh))
