"""Rotary position embedding (Su et al. 2021), half-split layout as in Llama/Mixtral/HF, and its
LongRoPE variant (Ding et al. 2024) as run by HF ``modeling_phimoe`` for Phi-3.5-MoE.

Shape legend: B batch, H heads, T query positions, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import math

import torch

from moelab.config import ModelConfig, YaRNConfig


def yarn_inv_freq(head_dim: int, theta: float, yarn: YaRNConfig, device=None) -> torch.Tensor:
    """(Dh/2,) YaRN frequencies (Peng et al. 2023 "NTK-by-parts"), as transformers 5.x
    ``_compute_yarn_parameters``: dimension i keeps its original frequency theta^(-2i/Dh) when it
    turns more than beta_fast times over the original context, is interpolated (divided by factor)
    when it turns fewer than beta_slow times, and is blended linearly in between."""
    pos_freqs_H = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    extrapolation_H, interpolation_H = 1.0 / pos_freqs_H, 1.0 / (yarn.factor * pos_freqs_H)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
        return head_dim * math.log(yarn.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp_H = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep_H = 1 - ramp_H  # 1: keep the original frequency
    return interpolation_H * (1 - keep_H) + extrapolation_H * keep_H


def rope_cos_sin(positions_T: torch.Tensor, head_dim: int, theta: float, factors: Sequence[float] | None = None,
                 mscale: float = 1.0, inv_freq_H: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, Dh) for integer positions, computed in fp32.

    LongRoPE: frequency i is theta^(-2i/Dh) / factors[i] (``factors``: Dh/2 numbers), and cos and
    sin are multiplied by ``mscale`` (so attention logits by mscale^2). ``inv_freq_H`` gives the
    frequencies directly (YaRN)."""
    exponent_H = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions_T.device) / head_dim
    if inv_freq_H is not None:
        pass
    elif factors is None:
        inv_freq_H = 1.0 / (theta ** exponent_H)  # (Dh/2,)
    else:
        factors_H = torch.tensor(factors, dtype=torch.float32, device=positions_T.device)  # (Dh/2,)
        inv_freq_H = 1.0 / (factors_H * theta ** exponent_H)
    freqs_TH = positions_T.float()[..., None] * inv_freq_H  # (T, Dh/2), or (B, T, Dh/2) per row
    emb_TD = torch.cat([freqs_TH, freqs_TH], dim=-1)  # (T, Dh)
    if mscale == 1.0:
        return emb_TD.cos(), emb_TD.sin()
    return emb_TD.cos() * mscale, emb_TD.sin() * mscale


def model_rope_cos_sin(config: ModelConfig, positions_T: torch.Tensor,
                       seq_len: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, Dh), or (B, T, Dh) for (B, T) positions, for the RoPE variant of ``config.attention``.

    ``seq_len`` picks LongRoPE's mscale for all of this forward's tokens: the length at the end of the
    forward, cache included (largest position + 1), or (B,) lengths, one per row, with (B, T) positions.
    This is transformers' rule (``max(position_ids) + 1``) in its cached generation too: each forward
    (prefill chunk, decode or verify step) takes the scale of its own length and cached keys keep theirs,
    so a chunked prefill equals the one pass only when every chunk ends on the full length's side of
    ``rope_original_max_len``. Per row, where transformers takes the batch's largest position, so a row
    computes in a batch what it computes alone."""
    a = config.attention
    dim = config.rope_dim
    if a.rope_type == "default":
        return rope_cos_sin(positions_T, dim, a.rope_theta)
    if a.rope_type == "yarn":
        inv_freq_H = yarn_inv_freq(dim, a.rope_theta, a.yarn, positions_T.device)
        return rope_cos_sin(positions_T, dim, a.rope_theta, mscale=a.yarn.cos_sin_factor(), inv_freq_H=inv_freq_H)
    # NOTE: Microsoft's original Phi-3.5-MoE remote code switches to rope_long_factor once the sequence
    # is longer than rope_original_max_len. transformers (5.23-5.25: PhimoeRotaryEmbedding.forward calls its
    # rope_init_fn without seq_len) uses rope_short_factor at every length and switches only the mscale.
    # moelab follows transformers, for logit parity with it; past rope_original_max_len the logits
    # therefore differ from the remote code's.
    short_mscale, long_mscale = config.rope_mscales()
    if isinstance(seq_len, torch.Tensor):  # (B,) lengths: the mscale of each row
        cos_BTD, sin_BTD = rope_cos_sin(positions_T, dim, a.rope_theta, factors=a.rope_short_factor)
        mscale_B11 = torch.where(seq_len > a.rope_original_max_len, long_mscale, short_mscale)[:, None, None]
        return cos_BTD * mscale_B11, sin_BTD * mscale_B11
    mscale = long_mscale if seq_len > a.rope_original_max_len else short_mscale
    return rope_cos_sin(positions_T, dim, a.rope_theta, factors=a.rope_short_factor, mscale=mscale)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(..., Dh) interleaved pairs (x0, x1), (x2, x3) ... -> half-split [x0, x2, ..., x1, x3, ...].
    Rotating the pairs (DeepSeek's complex RoPE) equals the half-split rotation of the permuted
    vector; q and k get the same permutation, so their dot products are unchanged."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate q or k; math in fp32, result in the input dtype. cos/sin (T, Dh), or (B, T, Dh) when
    positions differ per row (left padding)."""
    if cos_TD.ndim == 3:
        cos_TD, sin_TD = cos_TD[:, None], sin_TD[:, None]
    x32 = x_BHTD.float()
    out = x32 * cos_TD + _rotate_half(x32) * sin_TD
    return out.to(x_BHTD.dtype)
