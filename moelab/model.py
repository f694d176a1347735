"""The decoder-only transformer whose FFNs can be MoE layers.

Features: token embedding (optionally scaled), pre-norm blocks with RMSNorm or LayerNorm (optionally
sandwich norms, Grok-1), RoPE or LongRoPE (Phi-3.5-MoE) attention with MHA/GQA/MQA, sliding window,
q/k norm, clip_qkv and logit soft-cap, dense SwiGLU or MoE FFN per block (MoE every P-th layer,
first k dense), tied or untied LM head with optional bias, KV cache for decoding.

Shape legend: B batch, T positions, D model dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moelab.config import ModelConfig
from moelab.errors import ConfigError
from moelab.layers.attention import Attention, KVCache, LayerKVCache
from moelab.layers.mla import MLAttention
from moelab.layers.mlp import GatedMLP
from moelab.layers.norm import make_norm
from moelab.layers.rope import model_rope_cos_sin
from moelab.moe.layer import MoELayer


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    # lm_loss + sum of weighted aux losses + (lambda / D) * sum of mtp_losses (when labels are given)
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None  # mean cross-entropy over the targets (0, not NaN, when there is none)
    # the same summed over the targets: what data parallelism scales by world / global targets, so a rank
    # whose share has no target contributes exactly 0 through the same graph as every other rank
    lm_loss_sum: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, summed over MoE layers
    # unweighted L_MTP^k, k = 1..D; 0 for a depth with no target in the batch (not counted in the mean over depths)
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    mtp_loss_sums: list[torch.Tensor] = field(default_factory=list)  # each depth's, summed over its targets
    # (B, T, D) the last block's output after the final norm: the LM head's input, MTP depth 1's input and
    # HF's last_hidden_state (return_hidden)
    hidden: torch.Tensor | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        norm = lambda: make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)  # noqa: E731
        self.layer_idx = layer_idx
        self.attn_norm = norm()
        self.attn = MLAttention(cfg) if cfg.attention.mla is not None else Attention(cfg, layer_idx)
        self.ffn_norm = norm()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.ffn = MoELayer(cfg) if self.is_moe else GatedMLP(cfg.d_model, cfg.dense_ffn_dim, cfg.activation)
        self.post_attn_norm = norm() if cfg.sandwich_norm else None
        self.post_ffn_norm = norm() if cfg.sandwich_norm else None

    def forward(self, x_BTD, cos_TD, sin_TD, positions_T, cache: LayerKVCache | None = None,
                valid_BT: torch.Tensor | None = None):
        """``valid_BT``: False at padding, which is never attended to and never routed."""
        h = self.attn(self.attn_norm(x_BTD), cos_TD, sin_TD, positions_T, cache, valid_BT)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x_BTD = x_BTD + h
        routing = None
        if self.is_moe:
            h, routing = self.ffn(self.ffn_norm(x_BTD), valid_BT)
        else:
            h = self.ffn(self.ffn_norm(x_BTD))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x_BTD + h, routing


class MTPModule(nn.Module):
    """Multi-token prediction module k (DeepSeek-V3 §2.2, eq. 21-23), in the layout of the released
    checkpoints (``model.layers.{L+k-1}.{enorm,hnorm,eh_proj,shared_head.norm}`` + a decoder layer):
        h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])     embedding first (REFERENCES §4.3)
        h^k = norm(Block(h')),  P^k_{i+k+1} = OutHead(h^k_i)
    h^0 is the main model's last hidden state after its final norm, and h^k (k >= 1) is after the module's own
    norm: what transformers' MtpLayer / MtpModel (modeling_layers.py; ``norm`` is its ``post_norm``), Megatron
    and vLLM feed. NOTE: the paper does not say which side of the final norm h^0 is; the pre-norm state misses
    transformers' MTP logits by as much as the logits themselves. The embedding and the output head are the
    main model's (shared, not copied)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        norm = lambda: make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)  # noqa: E731
        self.enorm, self.hnorm = norm(), norm()
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = norm()

    def combine(self, h_BTD: torch.Tensor, emb_BTD: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_BTD)], dim=-1))

    def forward(self, h_BTD, emb_BTD, cos_TD, sin_TD, positions_T, cache: LayerKVCache | None = None,
                valid_BT: torch.Tensor | None = None):
        """h^k (normed) and the block's routing, from h^{k-1} (normed) and the embeddings of the tokens k ahead."""
        x_BTD, routing = self.block(self.combine(h_BTD, emb_BTD), cos_TD, sin_TD, positions_T, cache, valid_BT)
        return self.norm(x_BTD), routing


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
        self.mtp = None
        if cfg.mtp is not None:
            self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_layers + k) for k in range(cfg.mtp.num_modules))
        # lambda of L_MTP, set by the trainer at every step (MTPConfig.weight_at)
        self.mtp_weight = cfg.mtp.loss_weight if cfg.mtp is not None else 0.0
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
        for block in [*self.blocks, *(m.block for m in (self.mtp or []))]:
            block.compile(**compile_kwargs)

    def moe_layers(self) -> list[MoELayer]:
        """The main stack's MoE layers (MTP modules' own MoE layers are not among them)."""
        return [b.ffn for b in self.blocks if b.is_moe]

    def drop_mtp(self) -> None:
        """Remove the MTP modules (after training, when they are not used for drafting)."""
        self.mtp = None
        self.config = dataclasses.replace(self.config, mtp=None)

    def new_cache(self, rolling: bool = False) -> KVCache:
        """A KV cache for decoding; ``rolling``: sliding-window layers keep a rolling buffer of their
        window only (constant memory however long the output), the others the full cache."""
        windows = [b.attn.window if rolling and isinstance(b.attn, Attention) else None for b in self.blocks]
        return KVCache(len(self.blocks), windows)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False,
                attention_mask: torch.Tensor | None = None) -> ModelOutput:
        """``labels`` are aligned with ``input_ids`` (shifted inside, -100 ignored), as in HF. With
        labels and MTP modules the MTP losses are computed and added (weight ``self.mtp_weight``).

        ``attention_mask`` (B, cached + T), 1 = token, 0 = padding, as in HF: padding is never attended
        to, never routed (no capacity, loss, load or bias contribution) and never scored; positions
        count real tokens only, so a left-padded row computes what the unpadded sequence would."""
        B, T = input_ids.shape
        if cache is not None:
            for layer in self.modules():  # the MTP modules' too (mtp_logits decodes with a cache)
                if isinstance(layer, MoELayer):
                    layer.router.check_incremental()
        start = cache.seq_len if cache is not None else 0
        positions_T = torch.arange(start, start + T, device=input_ids.device)  # indices, for the masks
        valid_BT = rope_positions = None
        if attention_mask is not None:
            if attention_mask.shape != (B, start + T):
                raise ConfigError("attention_mask", tuple(attention_mask.shape),
                                  f"must be (batch, cached + new tokens) = {(B, start + T)}")
            mask_BS = attention_mask.bool()
            valid_BT = mask_BS[:, start:]
            rope_positions = (mask_BS.long().cumsum(1) - 1).clamp_min(0)[:, start:]  # (B, T) per row
            if labels is not None:  # a label counts when it is a token and so is the position predicting it
                prev_BT = torch.cat([mask_BS[:, start - 1:start] if start else valid_BT[:, :1] & False,
                                     valid_BT[:, :-1]], dim=1)
                labels = labels.masked_fill(~(valid_BT & prev_BT), -100)
        seq_len = start + T
        if attention_mask is not None and self.config.attention.rope_type == "longrope":
            seq_len = attention_mask.sum(1)  # (B,) real tokens per row: each row's own LongRoPE scale, as alone
        cos_TD, sin_TD = model_rope_cos_sin(self.config, positions_T if rope_positions is None else rope_positions,
                                            seq_len=seq_len)  # (T, Dh) each, or (B, T, Dh)
        x_BTD = self.embed_tokens(input_ids)
        aux: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x_BTD, routing = _checkpointed_block(block, x_BTD, cos_TD, sin_TD, positions_T, None, valid_BT)
            else:
                x_BTD, routing = block(x_BTD, cos_TD, sin_TD, positions_T, cache.layers[i] if cache else None,
                                       valid_BT)
            if routing is not None:
                for name, value in routing.aux_losses.items():
                    aux[name] = aux[name] + value if name in aux else value
        h_BTD = self.norm(x_BTD)
        logits_BTV = self.head(h_BTD)
        out = ModelOutput(logits=logits_BTV, aux_losses=aux, hidden=h_BTD if return_hidden else None)
        if labels is not None:
            out.lm_loss_sum, targets = _next_token_loss(logits_BTV, labels, 1)
            out.lm_loss = out.lm_loss_sum / targets.clamp_min(1)  # = F.cross_entropy's mean, bit for bit
            if self.mtp is not None and cache is None:  # also adds the modules' MoE aux losses to aux
                out.mtp_loss_sums, out.mtp_losses, depths = self._mtp_losses(
                    h_BTD, input_ids, labels, cos_TD, sin_TD, positions_T, aux, valid_BT)
            out.loss = out.lm_loss + sum(aux.values()) if aux else out.lm_loss
            if out.mtp_losses:  # (lambda / D) sum_k L_k over the D depths with a target (a tensor: no host sync)
                out.loss = out.loss + self.mtp_weight * sum(out.mtp_losses) / depths.clamp_min(1)
        return out

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, scaled by ``embedding_multiplier`` (Grok-1)."""
        x = self.embed(ids)
        return x * self.config.embedding_multiplier if self.config.embedding_multiplier != 1.0 else x

    def head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Logits from normed hidden states (the final norm's output, or an MTP module's)."""
        logits_BTV = self.lm_head(h_BTD)
        if self.config.output_multiplier != 1.0:
            logits_BTV = logits_BTV * self.config.output_multiplier
        return logits_BTV

    def _mtp_losses(self, h_BTD, input_ids, labels, cos_TD, sin_TD, positions_T, aux,
                    valid_BT: torch.Tensor | None = None) -> tuple[list, list, torch.Tensor]:
        """DeepSeek-V3 eq. 21-24: depth k sees positions i < T - k (h^{k-1}_i and token i + k) and
        predicts token i + k + 1, scored where that token is inside the sequence (i < T - k - 1).
        ``h_BTD``: the main model's hidden states after the final norm. Returns the per-depth summed and mean
        losses (0 for a depth with no target in the batch, e.g. rows of 2 real tokens) and how many depths
        had a target.
        Aux losses of the modules' MoE layers are added to ``aux``."""
        sums, losses, depths, T = [], [], labels.new_zeros(()), input_ids.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 2:
                break
            n = T - k  # positions of depth k
            emb_BnD = self.embed_tokens(input_ids[:, k:])
            # depth k at position i needs position i's hidden state and token i + k: both real
            valid = None if valid_BT is None else valid_BT[:, :n] & valid_BT[:, k:]
            args = (h_BTD[:, :n], emb_BnD, cos_TD[..., :n, :], sin_TD[..., :n, :], positions_T[:n], None, valid)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x_BnD, routing = _checkpointed_block(module.block, module.combine(args[0], emb_BnD), *args[2:])
                h_BTD = module.norm(x_BnD)
            else:
                h_BTD, routing = module(*args)
            if routing is not None:  # logged apart from the main stack's: "mtp_seq_balance", ...
                for name, value in routing.aux_losses.items():
                    key = f"mtp_{name}"
                    aux[key] = aux[key] + value if key in aux else value
            labels_k = labels[:, k:]
            if valid is not None:  # a target counts only when the position predicting it is real too
                labels_k = labels_k.clone()
                labels_k[:, 1:] = labels_k[:, 1:].masked_fill(~valid[:, :-1], -100)
            total, targets = _next_token_loss(self.head(h_BTD), labels_k, 1)
            sums.append(total)
            losses.append(total / targets.clamp_min(1))
            depths = depths + (targets > 0)
        return sums, losses, depths

    def mtp_logits(self, h_BTD: torch.Tensor, next_ids_BT: torch.Tensor, start: int,
                   cache: KVCache | None = None) -> torch.Tensor:
        """MTP module 1 on positions start .. start + T - 1: the main model's hidden states there (after
        the final norm: ``ModelOutput.hidden``) and the tokens that follow each give logits for the token
        after that, (B, T, V). ``cache``: the module's own one-layer KV cache, advanced by T positions
        (speculative decoding)."""
        T = h_BTD.shape[1]
        positions_T = torch.arange(start, start + T, device=h_BTD.device)
        cos_TD, sin_TD = model_rope_cos_sin(self.config, positions_T, seq_len=start + T)
        module = self.mtp[0]
        layer_cache = cache.layers[0] if cache is not None else None
        h, _ = module(h_BTD, self.embed_tokens(next_ids_BT), cos_TD, sin_TD, positions_T, layer_cache)
        return self.head(h)


def _next_token_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, shift: int):
    """Cross-entropy of logits at position i against labels at i + shift (-100 ignored), summed over the
    targets (0 when there is none, with the same graph), and the number of targets (a tensor: no sync).
    Divided by the count it is F.cross_entropy's mean bit for bit, forward and backward (tested)."""
    V = logits_BTV.shape[-1]
    logits_NV, labels_N = logits_BTV[:, :-shift].reshape(-1, V).float(), labels_BT[:, shift:].reshape(-1)
    total = F.cross_entropy(logits_NV, labels_N, ignore_index=-100, reduction="sum")
    return total, (labels_N != -100).sum()


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
