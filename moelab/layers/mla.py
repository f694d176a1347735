"""Multi-head latent attention, MLA (DeepSeek-V2 §2.1 eqs. 9-19; DeepSeek-V3 eqs. 1-11).

    c_Q = RMSNorm(W_DQ h)                      (or q = W_Q h without a query latent, V2-Lite)
    [q_C ; q_R] = W_UQ c_Q                     per head: qk_nope_head_dim + qk_rope_head_dim
    [c_KV ; k_R] = W_DKV h, c_KV = RMSNorm(c_KV)   one latent (kv_lora_rank) and one RoPE key for all heads
    [k_C ; v] = W_UKV c_KV                     per head: qk_nope_head_dim + v_head_dim
    q_i = [q_C,i ; RoPE(q_R,i)], k_i = [k_C,i ; RoPE(k_R)], o_i = softmax(q_i k_i^T * scale) v_i
    u = W_O [o_1 ... o_H]

Two computations of the same function:
- **expanded** (training, prefill without cache): keys and values materialised per head, one SDPA call.
- **absorbed** (with a KV cache): the cache keeps only c_KV and RoPE(k_R), kv_lora_rank +
  qk_rope_head_dim numbers per token and layer (576 for V2/V3 against 2 * 128 * 128 = 32768 for
  MHA). W_UK is absorbed into the query (q~_i = W_UK,i^T q_C,i, a kv_lora_rank vector per head),
  scores are q~_i . c_KV + q_R,i . k_R, and W_UV is applied after the weighted sum of latents.
With a cache, ``use_absorbed`` picks the path with the smaller attention tensors for each forward (a
single-token decode step: absorbed; a prefill or a long chunk: expanded); the cache keeps the latents
either way. ``MLAttention.absorb = False`` forces the expanded path; tests check both agree.

Softmax scale: 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim), times mscale(factor, mscale_all_dim)^2
with YaRN (as transformers applies it whenever the RoPE type is not default).

Shape legend: B batch, T new positions, S key positions, H heads, N qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, C kv_lora_rank, Q q_lora_rank, D model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig
from moelab.layers.attention import attention_mask
from moelab.layers.norm import RMSNorm
from moelab.layers.rope import apply_rope, deinterleave


def use_absorbed(T: int, S: int, num_heads: int, nope_dim: int, rope_dim: int, v_dim: int, elem_bytes: int) -> bool:
    """Whether T new tokens against S key positions cost less absorbed than expanded, by the bytes of the
    tensors each path builds per row: (H, T, S) fp32 scores, 4 H T S bytes, against per-head K and V,
    H S (N + R + V) elements of ``elem_bytes``. S cancels: absorbed while T <= (N + R + V) elem_bytes / 4,
    160 tokens for V3 in bf16 (a 512-token chunk at S = 32K: 8.6 GB of scores against 2.7 GB of K and V).
    FLOPs break even at nearly the same T (T (2C - N - V) = C (N + V): 171 for V3). A single token is
    always absorbed."""
    return T == 1 or 4 * num_heads * T * S <= num_heads * S * (nope_dim + rope_dim + v_dim) * elem_bytes


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a, m = cfg.attention, cfg.attention.mla
        assert m is not None
        self.num_heads = H = a.num_heads
        self.nope_dim, self.rope_dim, self.v_dim, self.latent_dim = (m.qk_nope_head_dim, m.qk_rope_head_dim,
                                                                     m.v_head_dim, m.kv_lora_rank)
        self.interleave = m.rope_interleave
        d, qk = cfg.d_model, m.qk_head_dim
        if m.q_lora_rank is not None:
            self.q_a_proj = nn.Linear(d, m.q_lora_rank, bias=a.qkv_bias)
            self.q_a_norm = RMSNorm(m.q_lora_rank, m.latent_norm_eps)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * qk, bias=False)
            self.q_proj = None
        else:
            self.q_proj = nn.Linear(d, H * qk, bias=False)
        self.kv_a_proj = nn.Linear(d, m.kv_lora_rank + m.qk_rope_head_dim, bias=a.qkv_bias)
        self.kv_a_norm = RMSNorm(m.kv_lora_rank, m.latent_norm_eps)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * m.v_head_dim, d, bias=a.out_bias)
        self.scale = qk ** -0.5 * (a.yarn.softmax_factor() if a.yarn is not None else 1.0)
        self.absorb = True  # False: the expanded path with a cache too (use_absorbed picks otherwise)

    def _query(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            return self.q_proj(x_BTD)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BTD)))

    def _rope(self, x: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        return apply_rope(deinterleave(x) if self.interleave else x, cos_TR, sin_TR)

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor, positions_T: torch.Tensor,
                cache=None, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, N, R, C = self.num_heads, self.nope_dim, self.rope_dim, self.latent_dim
        q_BHTK = self._query(x_BTD).view(B, T, H, N + R).transpose(1, 2)
        q_nope_BHTN, q_rope_BHTR = q_BHTK.split([N, R], dim=-1)
        q_rope_BHTR = self._rope(q_rope_BHTR, cos_TR, sin_TR)
        c_BTC, k_rope_BTR = self.kv_a_proj(x_BTD).split([C, R], dim=-1)
        c_B1TC = self.kv_a_norm(c_BTC)[:, None]  # (B, 1, T, C): the "one head" layout of the cache
        k_rope_B1TR = self._rope(k_rope_BTR[:, None], cos_TR, sin_TR)
        k_pos_S, k_valid_BS = positions_T, valid_BT
        if cache is not None:  # now S = cached + new positions
            c_B1TC, k_rope_B1TR, k_pos_S, k_valid_BS = cache.update(c_B1TC, k_rope_B1TR, valid_BT)
        # the cache keeps only latents either way; the path is the one with the smaller tensors
        absorb = self.absorb and cache is not None and use_absorbed(T, k_pos_S.shape[0], H, N, R, self.v_dim,
                                                                    c_B1TC.element_size())
        mask = self._mask(positions_T, k_pos_S, k_valid_BS)
        if absorb:
            o_BHTV = self._absorbed(q_nope_BHTN, q_rope_BHTR, c_B1TC, k_rope_B1TR, mask)
        else:
            o_BHTV = self._expanded(q_nope_BHTN, q_rope_BHTR, c_B1TC, k_rope_B1TR, mask)
        return self.o_proj(o_BHTV.transpose(1, 2).reshape(B, T, H * self.v_dim))

    @staticmethod
    def _mask(positions_T, k_pos_S, k_valid_BS):
        """None when the keys are exactly the new tokens with no padding (plain causal), else the
        (T, S) or (B, 1, T, S) boolean mask."""
        padded = k_valid_BS is not None and not bool(k_valid_BS.all())
        if k_pos_S.shape[0] == positions_T.shape[0] and not padded:
            return None
        return attention_mask(positions_T, k_pos_S, None, k_valid_BS if padded else None)

    def _expanded(self, q_nope_BHTN, q_rope_BHTR, c_B1SC, k_rope_B1SR, mask):
        B, H, T, N = q_nope_BHTN.shape
        S = c_B1SC.shape[2]
        kv_BSHK = self.kv_b_proj(c_B1SC[:, 0]).view(B, S, H, N + self.v_dim)
        k_nope_BHSN, v_BHSV = kv_BSHK.transpose(1, 2).split([N, self.v_dim], dim=-1)
        k_BHSK = torch.cat([k_nope_BHSN, k_rope_B1SR.expand(B, H, S, self.rope_dim)], dim=-1)
        q_BHTK = torch.cat([q_nope_BHTN, q_rope_BHTR], dim=-1)
        return F.scaled_dot_product_attention(q_BHTK, k_BHSK, v_BHSV, attn_mask=mask, is_causal=mask is None,
                                              scale=self.scale)

    def _absorbed(self, q_nope_BHTN, q_rope_BHTR, c_B1SC, k_rope_B1SR, mask):
        H, N, C = self.num_heads, self.nope_dim, self.latent_dim
        w_HKC = self.kv_b_proj.weight.view(H, N + self.v_dim, C)
        w_uk_HNC, w_uv_HVC = w_HKC[:, :N], w_HKC[:, N:]
        q_lat_BHTC = torch.einsum("bhtn,hnc->bhtc", q_nope_BHTN, w_uk_HNC)
        scores_BHTS = (q_lat_BHTC @ c_B1SC.transpose(-1, -2) + q_rope_BHTR @ k_rope_B1SR.transpose(-1, -2))
        scores_BHTS = scores_BHTS.float() * self.scale
        T, S = scores_BHTS.shape[-2:]
        if mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=scores_BHTS.device).tril()
        if mask is not None:
            scores_BHTS = scores_BHTS.masked_fill(~mask, float("-inf"))
        p_BHTS = scores_BHTS.softmax(-1).to(c_B1SC.dtype)
        o_lat_BHTC = p_BHTS @ c_B1SC  # the weighted sum of latents, (B, H, T, C)
        return torch.einsum("bhtc,hvc->bhtv", o_lat_BHTC, w_uv_HVC)
