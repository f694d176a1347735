"""Side-by-side training-step measurements: models timed in one process, in alternating order.

On a noisy 2-core CPU, absolute times drift by tens of percent between runs, and two torch
processes slow each other several-fold; only ratios measured in the same process, with the models'
repetitions interleaved, are meaningful. Each repetition runs every model once (the order rotates
between repetitions) on the same batch: forward, LM + aux loss, backward (no optimizer step).

Memory: the activations saved for backward during one forward (``saved_tensors_hooks``; parameters
and tensors sharing their storage are excluded, shared storages counted once), which is what
differs between MoE designs at equal parameter counts (AoE's T x E x d_low cache, its T x d_wide
activations). On CUDA the allocator's peak for the step is reported too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the non-parameter tensors autograd saves for backward in one training forward."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_storages:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids, labels=labels)
    del out
    return sum(seen.values())


def _step(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(input_ids, labels=labels).loss.backward()


def measure_training_steps(models: Mapping[str, nn.Module], input_ids: torch.Tensor, labels: torch.Tensor,
                           reps: int = 5, warmup: int = 1) -> dict[str, dict]:
    """For every model: median tokens/s of forward + backward over ``reps`` interleaved repetitions,
    the saved-for-backward bytes of one forward, and (CUDA) the peak bytes one step allocates above
    the resident weights and optimizer-free state."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for m in models.values():
        m.train()
    for _ in range(warmup):
        for n in names:
            _step(models[n], input_ids, labels)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            if input_ids.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _step(models[n], input_ids, labels)
            if input_ids.is_cuda:
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t0)
    tokens = input_ids.numel()
    for m in models.values():  # no model's gradients may count in another's peak
        m.zero_grad(set_to_none=True)
    out = {}
    for n in names:
        peak = None
        if input_ids.is_cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            _step(models[n], input_ids, labels)
            models[n].zero_grad(set_to_none=True)
            peak = torch.cuda.max_memory_allocated() - base  # this step's own peak above the resident state
        out[n] = {"tokens_per_s": tokens / statistics.median(times[n]), "step_s": times[n],
                  "activation_bytes": saved_activation_bytes(models[n], input_ids, labels),
                  "cuda_peak_bytes": peak}
        models[n].zero_grad(set_to_none=True)
    return out


def ratios_to(results: Mapping[str, dict], reference: str) -> dict[str, dict]:
    """tokens/s and activation bytes of every model divided by those of ``reference``."""
    ref = results[reference]
    return {n: {"tokens_per_s_ratio": r["tokens_per_s"] / ref["tokens_per_s"],
                "activation_bytes_ratio": r["activation_bytes"] / ref["activation_bytes"]}
            for n, r in results.items()}
