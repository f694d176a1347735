"""The routing recorder: attaches to a model from outside (forward hooks on its MoE layers) and keeps,
per MoE layer and token, what the analyses need.

Per token (only real tokens: those of a forward run with an attention mask, which the MoE layers
route alone, or those the caller marks with :meth:`RoutingRecorder.set_mask`):
- ``experts``: the selected experts in choice order, padded with -1 (K columns for token choice,
  up to E for expert choice / top-p), int16;
- ``weights``: their combine weights (fp32), 0 where padded;
- ``scores``: the full score vector the router selected from (router probabilities, or for AoE
  the softmax of the expert norms), fp32 (fp16 would tie close scores and shift their ranks);
- ``dropped``: which of the selected experts a capacity limit dropped (bool);
- with ``expert_outputs=True``: the L2 norm of every expert's unweighted output (all experts are run
  on every token, as "A Closer Look into MoE" does), fp32, and the per-layer sum over tokens of the
  angular and the cosine similarity of every pair of expert outputs (E x E, float64).
Logits are unchanged (the hooks only read; the extra expert runs are under no_grad). Arrays are
kept in chunks, in memory or, with ``spill_dir``, as ``.npy`` files read back memory-mapped, so
long inputs need not live in memory. There is no global state: detach with ``close()`` or use the
recorder as a context manager. :func:`record` streams windows of token ids through a model with a
recorder attached: the one way every analysis runs a model over tokens.

Shape legend: T tokens (real ones of a batch), E experts, K selected per token, D model dim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moelab.analysis.similarity import OUTPUT_SIMILARITIES, output_similarity_sums
from moelab.moe.dispatch import choice_rank
from moelab.moe.layer import MoELayer
from moelab.moe.routing import Routing


class _Chunks:
    """Append-only list of equally-typed 2-D arrays, optionally spilled to ``.npy`` files."""

    def __init__(self, spill: Path | None, name: str):
        self.spill, self.name, self.parts = spill, name, []

    def append(self, a: np.ndarray) -> None:
        if self.spill is not None:
            path = self.spill / f"{self.name}_{len(self.parts):06d}.npy"
            np.save(path, a)
            a = np.load(path, mmap_mode="r")
        self.parts.append(a)

    def concat(self, pad_value=None) -> np.ndarray:
        """All chunks, rows concatenated; chunks of fewer columns are padded with ``pad_value``."""
        if not self.parts:
            return np.zeros((0, 0))
        if self.parts[0].ndim == 1:
            return np.concatenate(self.parts)
        width = max(p.shape[1] for p in self.parts)
        out = [p if p.shape[1] == width else np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=pad_value)
               for p in self.parts]
        return np.concatenate(out)


class LayerTrace:
    def __init__(self, block_index: int, num_experts: int, spill: Path | None):
        self.block_index, self.num_experts = block_index, num_experts
        prefix = f"layer{block_index}"
        self.experts = _Chunks(spill, f"{prefix}_experts")
        self.weights = _Chunks(spill, f"{prefix}_weights")
        self.scores = _Chunks(spill, f"{prefix}_scores")
        self.dropped = _Chunks(spill, f"{prefix}_dropped")
        self.output_norms = _Chunks(spill, f"{prefix}_output_norms")
        # per measure (moelab.analysis.similarity.OUTPUT_SIMILARITIES), the sum over tokens of E x E similarities
        self.output_sim_sum = {m: np.zeros((num_experts, num_experts)) for m in OUTPUT_SIMILARITIES}
        self.output_sim_tokens = 0

    def output_similarity(self, measure: str) -> np.ndarray:
        """The mean over the recorded tokens of the E x E output similarity."""
        return self.output_sim_sum[measure] / max(self.output_sim_tokens, 1)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"experts": self.experts.concat(-1), "weights": self.weights.concat(0.0),
                "scores": self.scores.concat(), "dropped": self.dropped.concat(False),
                "output_norms": self.output_norms.concat() if self.output_norms.parts else None}


def per_token_choices(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, W) experts in choice order (-1 padded), their weights, their dropped flags; W = the
    most experts any token got."""
    T = routing.num_tokens
    rank_A = choice_rank(routing)
    W = int(rank_A.max()) + 1 if rank_A.numel() else 1
    experts = torch.full((T, W), -1, dtype=torch.long, device=rank_A.device)
    weights = torch.zeros(T, W, dtype=torch.float32, device=rank_A.device)
    dropped = torch.zeros(T, W, dtype=torch.bool, device=rank_A.device)
    experts[routing.token_idx_A, rank_A] = routing.expert_idx_A
    weights[routing.token_idx_A, rank_A] = routing.weight_A.detach().float()
    if routing.kept_A is not None:
        dropped[routing.token_idx_A, rank_A] = ~routing.kept_A
    return experts, weights, dropped


@torch.no_grad()
def all_expert_outputs(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, E, D): every expert's unweighted output on every token (a loop over experts: on CPU
    it beats one batched einsum, which materialises (E, T, F) twice)."""
    ex = layer.experts
    return torch.stack([ex.expert(e, x_TD) for e in range(layer.num_experts)], dim=1)


class RoutingRecorder:
    def __init__(self, model, layers: list[int] | None = None, expert_outputs: bool = False,
                 spill_dir: str | Path | None = None, token_chunk: int = 1024):
        blocks = [(i, b.ffn) for i, b in enumerate(model.blocks) if b.is_moe]
        chosen = blocks if layers is None else [(i, m) for i, m in blocks if i in set(layers)]
        self.expert_outputs, self.token_chunk = expert_outputs, token_chunk
        spill = Path(spill_dir) if spill_dir is not None else None
        if spill is not None:
            spill.mkdir(parents=True, exist_ok=True)
        self.traces = {i: LayerTrace(i, m.num_experts, spill) for i, m in chosen}
        self._mask: torch.Tensor | None = None
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in chosen]

    def set_mask(self, mask_BT: torch.Tensor | None) -> None:
        """Which tokens of the next forward to record (padding excluded); None = all."""
        self._mask = mask_BT

    def _hook(self, block_index: int):
        def hook(module: MoELayer, inputs, output):
            x_BTD = inputs[0]
            routing: Routing = output[1]
            x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
            if routing.num_tokens != x_TD.shape[0]:  # a masked forward: the layer routed the real tokens only
                x_TD = x_TD[inputs[1].reshape(-1)]  # the same tokens, sequence-major as the routing's
                keep_T = torch.ones(routing.num_tokens, dtype=torch.bool, device=x_BTD.device)
            else:
                keep_T = (self._mask.reshape(-1).to(x_BTD.device) if self._mask is not None
                          else torch.ones(routing.num_tokens, dtype=torch.bool, device=x_BTD.device))
                x_TD = x_TD[keep_T]
            experts, weights, dropped = per_token_choices(routing)
            tr = self.traces[block_index]
            tr.experts.append(experts[keep_T].to(torch.int16).cpu().numpy())
            tr.weights.append(weights[keep_T].cpu().numpy())
            tr.dropped.append(dropped[keep_T].cpu().numpy())
            tr.scores.append(routing.probs_TE.detach()[keep_T].float().cpu().numpy())
            if self.expert_outputs:
                norms = []
                for s in range(0, x_TD.shape[0], self.token_chunk):
                    y_TED = all_expert_outputs(module, x_TD[s:s + self.token_chunk]).float()
                    norms.append(y_TED.norm(dim=-1))
                    for m, sum_EE in output_similarity_sums(y_TED).items():
                        tr.output_sim_sum[m] += sum_EE
                    tr.output_sim_tokens += y_TED.shape[0]
                tr.output_norms.append(torch.cat(norms).cpu().numpy() if norms else np.zeros((0, module.num_experts)))
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batches(windows, batch_size: int):
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        width = max(len(w[2]) for w in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for r, (_, _, w) in enumerate(chunk):
            ids[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = True
        yield chunk, ids, mask


def record(model, windows, batch_size: int, layers: list[int] | None, expert_outputs: bool,
           progress: bool = True, spill_dir: Path | None = None, total: int | None = None):
    """Run ``windows`` through ``model`` with a recorder; returns (recorder, token columns)."""
    from tqdm.auto import tqdm

    rec = RoutingRecorder(model, layers=layers, expert_outputs=expert_outputs, spill_dir=spill_dir)
    cols = {"token": [], "doc": [], "pos": [], "row_pos": []}
    bar = tqdm(total=total, desc="analyze", unit="tok", disable=not progress, dynamic_ncols=True)
    model.eval()
    try:
        with torch.no_grad():
            for chunk, ids, mask in _batches(windows, batch_size):
                rec.set_mask(mask)
                model(ids, attention_mask=mask)  # padding is neither attended to nor routed
                for di, start, w in chunk:
                    cols["token"].append(np.asarray(w, dtype=np.int64))
                    cols["doc"].append(np.full(len(w), di, dtype=np.int64))
                    cols["pos"].append(np.arange(start, start + len(w), dtype=np.int64))
                    cols["row_pos"].append(np.arange(len(w), dtype=np.int64))
                bar.update(int(mask.sum()))
    finally:
        rec.close()
        bar.close()
    return rec, {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in cols.items()}
