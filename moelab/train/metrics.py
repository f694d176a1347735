"""Training metrics: expert-load statistics and the JSONL log (TensorBoard as an optional extra sink).

Load statistics per MoE layer from the assignment counts c_e of a step (REFERENCES §11):
fraction c_e / sum c, max/mean load = max_e c_e / mean c (= 1 + MaxVio), coefficient of variation
(computed by :func:`moelab.moe.metrics.load_balance_metrics`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moelab.errors import MoelabError
from moelab.fileio import fsync_dir, write_atomic
from moelab.moe.metrics import load_balance_metrics


def load_stats(counts: list[torch.Tensor]) -> dict:
    """Per-layer load fractions and imbalance (max/mean load, MaxVio, CV) from per-layer counts (E,)."""
    if not counts:
        return {}
    per_layer = [load_balance_metrics(c) for c in counts]
    fractions = [[round(float(v), 6) for v in c.double() / c.double().sum()] for c in counts]
    max_mean = [m["max_load_ratio"] for m in per_layer]
    return {"load": fractions, "max_load_per_layer": max_mean, "max_load": max(max_mean),
            "mean_max_vio": sum(m["max_vio"] for m in per_layer) / len(per_layer),
            "load_cv": sum(m["cv"] for m in per_layer) / len(per_layer)}


def parse_lines(text: str, source: str) -> list[tuple[str, dict]]:
    """(line, record) of a JSONL metrics file. A last line cut short (the process was killed while
    writing it) is dropped; a malformed line anywhere else is an error naming it."""
    lines = [line for line in text.splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break  # an interrupted append
            raise MoelabError(f"{source}: line {i + 1} is not valid JSON ({e})") from e
    return out


class MetricsLog:
    """Append-only JSONL; on resume, records after the resumed step are dropped first."""

    def __init__(self, path: Path, truncate_after: int = 0, tensorboard: bool = False):
        self.path = path
        if truncate_after and path.is_file():
            kept = [line for line, rec in parse_lines(path.read_text(), str(path))
                    if rec.get("step", 0) <= truncate_after]
            write_atomic(path, "".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard:  # checked before anything is opened or written
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise MoelabError("--tensorboard needs the tensorboard package: pip install 'moelab[tensorboard]'") from e
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        new = not path.exists()
        self.file = open(path, "a")
        if new:  # its directory entry is durable from the start (the data with each sync())
            fsync_dir(path.parent)

    def truncate(self, step: int) -> None:
        """Drop the records after ``step`` (a rollback), keeping the file open for appending."""
        self.file.close()
        kept = [line for line, rec in parse_lines(self.path.read_text(), str(self.path)) if rec.get("step", 0) <= step]
        write_atomic(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")

    def sync(self) -> None:
        """Flush the appended records to disk (fsync): called before a checkpoint is published, so a
        power loss never leaves a checkpoint whose steps are missing from the log."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in _scalars(record):
                self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _scalars(record: dict, prefix: str = ""):
    for k, v in record.items():
        if isinstance(v, bool) or k in ("kind", "step"):
            continue
        if isinstance(v, (int, float)):
            yield prefix + k, v
        elif isinstance(v, dict):
            yield from _scalars(v, f"{prefix}{k}/")
