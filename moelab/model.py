"""The decoder-only transformer whose FFNs can be MoE layers.

Features: token embedding (optionally scaled), pre-norm blocks with RMSNorm or LayerNorm (optionally
sandwich norms, Grok-1), RoPE or LongRoPE (Phi-3.5-MoE) attention with MHA/GQA/MQA, sliding window,
q/k norm, clip_qkv and logit soft-cap, dense SwiGLU or MoE FFN per block (MoE every P-th layer,
first k dense), tied or untied LM head with optional bias, KV cache for decoding.

Shape legend: B batch, T positions, D model dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moelab.config import ModelConfig
from moelab.layers.attention import Attention, KVCache, LayerKVCache
from moelab.layers.mla import MLAttention
from moelab.layers.mlp import GatedMLP
from moelab.layers.norm import make_norm
from moelab.layers.rope import model_rope_cos_sin
from moelab.moe.layer import MoELayer


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # lm_loss + sum of weighted aux losses (when labels are given)
    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, summed over MoE layers


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        norm = lambda: make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)  # noqa: E731
        self.layer_idx = layer_idx
        self.attn_norm = norm()
        self.attn = MLAttention(cfg) if cfg.attention.mla is not None else Attention(cfg)
        self.ffn_norm = norm()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.ffn = MoELayer(cfg) if self.is_moe else GatedMLP(cfg.d_model, cfg.dense_ffn_dim, cfg.activation)
        self.post_attn_norm = norm() if cfg.sandwich_norm else None
        self.post_ffn_norm = norm() if cfg.sandwich_norm else None

    def forward(self, x_BTD, cos_TD, sin_TD, positions_T, cache: LayerKVCache | None = None):
        h = self.attn(self.attn_norm(x_BTD), cos_TD, sin_TD, positions_T, cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x_BTD = x_BTD + h
        routing = None
        if self.is_moe:
            h, routing = self.ffn(self.ffn_norm(x_BTD))
        else:
            h = self.ffn(self.ffn_norm(x_BTD))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x_BTD + h, routing


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # per-block torch.utils.checkpoint in training; settable at run time (a training flag)
        self.activation_checkpointing = cfg.activation_checkpointing
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices, std / sqrt(2 L) for residual-branch outputs (GPT-2),
        zeros for biases, ones for norm weights."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                nn.init.zeros_(p)
            elif p.ndim == 1:  # norm weights
                nn.init.ones_(p)
            elif "o_proj" in name or "down_proj" in name or leaf in ("down_EDF", "wo_EDW"):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)
        for layer in self.moe_layers():
            layer.reset_extra_parameters()  # e.g. Shazeer's W_noise starts at zero

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` every block in place (regional compilation: one block's code, compiled
        once and reused by the other blocks of the same shape; keyword arguments go to
        ``torch.compile``, e.g. ``backend``, ``mode``, ``dynamic``).

        Why blocks and not the whole model: a graph break inside the loop over blocks makes dynamo
        give up on the whole loop. The graph breaks that remain, by design (docs/performance.md):
        the MoE dispatch reads the per-expert row counts on the host (one ``.tolist()`` per MoE layer
        and forward; on CUDA the grouped-matmul path has none) and AoE's expert loop. Decoding a few
        tokens takes a gathered-weights batched matmul under compile, which has static shapes, so a
        compiled decode step does not recompile when other experts are chosen."""
        for block in self.blocks:
            block.compile(**compile_kwargs)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """``labels`` are aligned with ``input_ids`` (shifted inside, -100 ignored), as in HF."""
        B, T = input_ids.shape
        if cache is not None:
            for layer in self.moe_layers():
                layer.router.check_incremental()
        start = cache.seq_len if cache is not None else 0
        positions_T = torch.arange(start, start + T, device=input_ids.device)
        cos_TD, sin_TD = model_rope_cos_sin(self.config, positions_T, seq_len=start + T)  # (T, Dh) each
        x_BTD = self.embed(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x_BTD = x_BTD * self.config.embedding_multiplier
        aux: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x_BTD, routing = _checkpointed_block(block, x_BTD, cos_TD, sin_TD, positions_T)
            else:
                x_BTD, routing = block(x_BTD, cos_TD, sin_TD, positions_T, cache.layers[i] if cache else None)
            if routing is not None:
                for name, value in routing.aux_losses.items():
                    aux[name] = aux[name] + value if name in aux else value
        logits_BTV = self.lm_head(self.norm(x_BTD))
        if self.config.output_multiplier != 1.0:
            logits_BTV = logits_BTV * self.config.output_multiplier
        out = ModelOutput(logits=logits_BTV, aux_losses=aux)
        if labels is not None:
            out.lm_loss = F.cross_entropy(
                logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float(),
                labels[:, 1:].reshape(-1), ignore_index=-100)
            out.loss = out.lm_loss + sum(aux.values()) if aux else out.lm_loss
        return out


def _checkpointed_block(block: Block, *args):
    """Run ``block`` under torch.utils.checkpoint (non-reentrant: the routing result passes through).
    Backward runs the block a second time; its MoE layer records metrics and load counters only on
    the first run, so nothing is counted twice (the bug class of Megatron-LM#1330). The RNG state is
    restored for the rerun, so jitter and router noise are identical."""
    runs = [0]

    def run(*a):
        runs[0] += 1
        if runs[0] == 1 or not block.is_moe:
            return block(*a)
        block.ffn.record_stats = False
        try:
            return block(*a)
        finally:
            block.ffn.record_stats = True

    return checkpoint(run, *args, use_reentrant=False)


def build_model(cfg: ModelConfig, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> MoETransformer:
    """Build a model; ``device="meta"`` allocates no memory (for counting parameters)."""
    with torch.device(device or "cpu"):
        model = MoETransformer(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
