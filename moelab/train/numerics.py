"""Numerics guards of the training loop: non-finite losses or gradients, and loss spikes.

- A step whose loss or gradient norm is NaN/Inf is caught before the optimizer applies it.
  ``nonfinite="stop"`` ends training with a diagnostic; ``"skip"`` drops that update (the data and
  the schedule move on, as PaLM skipped batches around its spikes) and stops after ``max_skips``.
- Either way :func:`diagnose` re-runs the step's last micro-batch with hooks and names the first
  module (in execution order) whose output is non-finite and the first parameter whose gradient or
  value is, and saves every MoE layer's router logits and expert loads at that step
  (``RUN/diagnostics/step_N/``: ``routing.safetensors`` + ``diagnosis.json``).
- A loss above ``spike_factor`` x the median of the previous ``spike_window`` steps is a spike:
  ``spike_action="warn"`` logs it, ``"stop"`` ends training, ``"rollback"`` restores the last
  checkpoint (weights, optimizer, schedule, RNG) and continues on the data after the spike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def finite(x: float) -> bool:
    return math.isfinite(x)


def _nonfinite(t) -> bool:
    if isinstance(t, torch.Tensor):
        return t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())
    if isinstance(t, (tuple, list)):
        return any(_nonfinite(x) for x in t)
    if hasattr(t, "logits_TE"):  # a Routing
        return _nonfinite(t.logits_TE) or _nonfinite(getattr(t, "weight_A", None))
    logits = getattr(t, "logits", None)  # ModelOutput
    return _nonfinite(logits) if logits is not None else False


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; a plain tensor as it is. A DTensor's own
    ``isfinite().all()`` is a partial result: checked locally, the verdicts are reduced over the ranks."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _first_on_any_rank(flags: list[bool], env) -> int | None:
    """The first index flagged on any rank (one all-reduce), None when none is."""
    if env is not None and flags:
        t = torch.tensor([float(f) for f in flags], dtype=torch.float32, device="cpu")
        env.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flags = [bool(v) for v in t.tolist()]
    return next((i for i, f in enumerate(flags) if f), None)


@torch.no_grad()
def diagnose(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, out_dir: Path, step: int,
             reason: str, write: bool = True, env=None) -> dict:
    """Name where the non-finite value starts and save the routing of the step (see module doc).
    ``env`` (several processes, every rank calls it): outputs, weights and gradients are checked on
    every rank's tokens and shards and the first found on any rank is named; the routing saved is
    this rank's (rank 0 writes)."""
    from moelab.moe.layer import MoELayer

    executed: list[str] = []  # modules in the order their forward ended (the same on every rank)
    bad_out: list[bool] = []
    routing: dict[str, torch.Tensor] = {}
    hooks = []
    names = {m: n for n, m in model.named_modules()}
    for module in model.modules():
        def hook(mod, args, output, name=names[module]):
            executed.append(name or "(model)")
            bad_out.append(not any(bad_out) and _nonfinite(output))
            if isinstance(mod, MoELayer):
                r = output[1]
                if r is not None and r.logits_TE is not None:
                    routing[f"{name}.router_logits"] = r.logits_TE.detach().float().contiguous().cpu()
                if mod.last_counts_E is not None:
                    routing[f"{name}.expert_load"] = mod.last_counts_E.detach().float().contiguous().cpu()
        hooks.append(module.register_forward_hook(hook))
    was = model.training
    try:
        model.train()
        model(ids, labels=labels)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    first = _first_on_any_rank(bad_out, env)
    params = list(model.named_parameters())
    bad_grad = _first_on_any_rank([p.grad is not None and _nonfinite(_local(p.grad)) for _, p in params], env)
    bad_param = _first_on_any_rank([_nonfinite(_local(p)) for _, p in params], env)
    d = Path(out_dir) / f"step_{step:06d}"
    info = {"step": step, "reason": reason, "first_nonfinite_output": executed[first] if first is not None else None,
            "first_nonfinite_gradient": params[bad_grad][0] if bad_grad is not None else None,
            "first_nonfinite_parameter": params[bad_param][0] if bad_param is not None else None,
            "saved": sorted(routing), "directory": str(d)}
    if write:  # one process writes (rank 0)
        d.mkdir(parents=True, exist_ok=True)
        if routing:
            save_file(routing, str(d / "routing.safetensors"))
        (d / "diagnosis.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def describe(info: dict) -> str:
    parts = [f"first non-finite output: {info['first_nonfinite_output'] or 'none (the forward is finite)'}"]
    if info["first_nonfinite_gradient"]:
        parts.append(f"first non-finite gradient: {info['first_nonfinite_gradient']}")
    if info["first_nonfinite_parameter"]:
        parts.append(f"first non-finite weight: {info['first_nonfinite_parameter']}")
    return "; ".join(parts) + f"; router logits and expert loads saved in {info['directory']}"


class SpikeDetector:
    """The recent losses and the steps they belong to (skipped steps and spikes have no loss here)."""

    def __init__(self, factor: float, window: int):
        self.factor, self.window = factor, window
        self.history: list[float] = []
        self.steps: list[int | None] = []

    def check(self, loss: float, step: int | None = None) -> float | None:
        """The median it exceeded when ``loss`` is a spike (then not added to the history), else None."""
        if self.factor > 0 and len(self.history) >= min(self.window, 5):
            recent = sorted(self.history[-self.window:])
            median = recent[len(recent) // 2]
            if loss > self.factor * median:
                return median
        self.history.append(loss)
        self.steps.append(step)
        return None

    def drop_after(self, step: int) -> None:
        """Forget the losses of steps after ``step`` (a rollback to the checkpoint of that step)."""
        keep = [i for i, s in enumerate(self.steps) if s is None or s <= step]
        self.history = [self.history[i] for i in keep]
        self.steps = [self.steps[i] for i in keep]
