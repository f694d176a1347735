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


def clip_gradients(model: nn.Module, max_norm: float, env=None) -> torch.Tensor:
    """The global gradient norm, after scaling the gradients to at most ``max_norm`` (inf: no clipping)
    as ``torch.nn.utils.clip_grad_norm_`` does, bit for bit; ``env``: several processes
    (:func:`moelab.distributed.runtime.clip_grad_norm`). A non-finite norm scales nothing: the clip
    factor would be NaN (also for ``max_norm`` inf) and turn every gradient NaN before :func:`diagnose`
    looks for the one that was."""
    if env is not None:
        from moelab.distributed.runtime import clip_grad_norm

        return clip_grad_norm(model, max_norm, env)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if math.isfinite(max_norm) and math.isfinite(float(norm)):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def global_verdict(grad_norm: float, loss: float, env=None) -> tuple[bool, float]:
    """Whether the step is non-finite on any rank, and the global batch's loss (the mean of the ranks'
    shares, as the logged metrics are): one all-reduce. ``grad_norm`` is already global."""
    bad = not (math.isfinite(grad_norm) and math.isfinite(loss))
    if env is None:
        return bad, loss
    t = torch.tensor([float(bad), loss], dtype=torch.float64, device="cpu")  # host numbers: over gloo
    env.all_reduce(t)
    return bool(t[0] > 0), float(t[1]) / env.world


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; a plain tensor as it is. A DTensor's own
    ``isfinite().all()`` is a partial result: checked locally, the verdicts are reduced over the ranks."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _first(codes: torch.Tensor) -> int | None:
    """The index of the smallest code (the first on ties), None when every code is inf."""
    return int(torch.argmin(codes)) if bool(codes.isfinite().any()) else None


def _reshard(model: nn.Module) -> None:
    """With ``reshard_after_forward: false`` FSDP2 leaves the parameters gathered after a forward with no
    backward: shard them again, as the training step expects."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def diagnose(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, out_dir: Path, step: int,
             reason: str, write: bool = True, env=None) -> dict:
    """Name where the non-finite value starts and save the routing of the step (see module doc).
    ``env`` (several processes, every rank calls it): outputs, weights and gradients are checked on
    every rank's tokens and shards and the first found on any rank is named; the routing saved is
    this rank's (rank 0 writes).

    Gradients and weights are checked before the forward (after it FSDP2 may hold gathered parameters,
    which have no gradient). Every verdict is one number per module or parameter, in
    ``named_modules()`` / ``named_parameters()`` order, the same on every rank whatever modules a rank's
    forward ran (a few-token MoE layer skips its experts' forward): for a module the position in this
    rank's execution order of its output when it is the rank's first non-finite one, else inf; the
    minimum over the ranks names the first (earliest on any rank; in module order on ties)."""
    from moelab.moe.layer import MoELayer

    params = list(model.named_parameters())
    grad_codes = [0.0 if p.grad is not None and _nonfinite(_local(p.grad)) else math.inf for _, p in params]
    param_codes = [0.0 if _nonfinite(_local(p)) else math.inf for _, p in params]
    modules = list(model.named_modules())
    first_out = [math.inf] * len(modules)
    executed, found = [0], [False]  # forwards ended so far; whether a non-finite output was seen
    routing: dict[str, torch.Tensor] = {}
    hooks = []
    for index, (name, module) in enumerate(modules):
        def hook(mod, args, output, name=name, index=index):
            if not found[0] and _nonfinite(output):
                first_out[index], found[0] = float(executed[0]), True
            executed[0] += 1
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
        _reshard(model)
    codes = torch.tensor([*first_out, *grad_codes, *param_codes], dtype=torch.float64, device="cpu")
    if env is not None:  # one all-reduce of every verdict (host numbers: over gloo)
        env.all_reduce(codes, op=torch.distributed.ReduceOp.MIN)
    out_codes, grad_t, param_t = codes.split([len(modules), len(params), len(params)])
    first, bad_grad, bad_param = (_first(c) for c in (out_codes, grad_t, param_t))
    d = Path(out_dir) / f"step_{step:06d}"
    info = {"step": step, "reason": reason,
            "first_nonfinite_output": (modules[first][0] or "(model)") if first is not None else None,
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
