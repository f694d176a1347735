"""Fault injection for reliability tests: ``MOELAB_FAULT="STEP:RANK:MODE"`` makes rank RANK fail right
after training step STEP, with MODE ``raise`` (an exception: the process exits with an error),
``exit`` (``os._exit(3)``: the process vanishes without cleanup) or ``hang`` (stops answering, so the
other ranks' collectives time out). Unset in normal runs; read once per step."""

from __future__ import annotations

import os
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
