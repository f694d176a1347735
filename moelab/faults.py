"""Fault injection for reliability tests (unset in normal runs: one environment lookup per call).

- ``MOELAB_FAULT="STEP:RANK:MODE"`` makes rank RANK fail right after training step STEP, with MODE
  ``raise`` (an exception: the process exits with an error), ``exit`` (``os._exit(3)``: the process
  vanishes without cleanup) or ``hang`` (stops answering, so the other ranks' collectives time out).
- ``MOELAB_KILL_AT="PHASE[:N]"`` SIGKILLs the process the N-th time (default the first) it reaches
  PHASE, one of :data:`KILL_PHASES`: the moments of a checkpoint save where a crash is most
  dangerous (``moelab ckpt torture`` uses them next to kills at random times).
"""

from __future__ import annotations

import os
import signal
import time

from moelab.errors import MoelabError

ENV = "MOELAB_FAULT"


def maybe_inject_fault(step: int, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    try:
        at_step, at_rank, mode = spec.split(":")
        at_step, at_rank = int(at_step), int(at_rank)
    except ValueError as e:
        raise MoelabError(f"{ENV}={spec!r}: expected STEP:RANK:MODE, e.g. 2:1:raise") from e
    if step != at_step or rank != at_rank:
        return
    if mode == "raise":
        raise MoelabError(f"injected fault ({ENV}={spec}) on rank {rank} after step {step}")
    if mode == "exit":
        os._exit(3)
    if mode == "hang":
        time.sleep(10**6)
    raise MoelabError(f"{ENV}={spec!r}: MODE must be raise, exit or hang")


KILL_ENV = "MOELAB_KILL_AT"
# ckpt-weights: model files written into the temp dir; ckpt-state: optimizer/RNG state written too;
# ckpt-manifest: manifest written, not yet renamed; ckpt-rename: between moving an existing checkpoint
# of the same step aside and renaming the new one in (or just before the rename); ckpt-prune: renamed,
# old checkpoints not yet deleted
KILL_PHASES = ("ckpt-weights", "ckpt-state", "ckpt-manifest", "ckpt-rename", "ckpt-prune")
_reached: dict[str, int] = {}


def kill_point(phase: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name not in KILL_PHASES:
        raise MoelabError(f"{KILL_ENV}={spec!r}: PHASE must be one of {', '.join(KILL_PHASES)}")
    if name != phase:
        return
    _reached[phase] = _reached.get(phase, 0) + 1
    if _reached[phase] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
