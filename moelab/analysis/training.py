"""Routing over training (OpenMoE §4, "routing is learned early"): for a run directory, the top-1
expert of every checkpoint on a fixed probe set compared with the final checkpoint's, per MoE layer.

``agreement[layer][i]`` = the fraction of probe tokens whose top-1 expert at checkpoint i equals the
final checkpoint's (1.0 for the final one). The probe set is the analysed windows, up to 4096 tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def routing_over_training(source, windows, batch_size: int, layers: list[int], probe_tokens: int = 4096) -> dict | None:
    """None when ``source`` is not a run directory with at least two checkpoints."""
    from moelab.analysis.recorder import record
    from moelab.checkpoint.model_files import load_model
    from moelab.checkpoint.run import checkpoint_dirs

    ckpts = checkpoint_dirs(Path(source)) if (Path(source) / "checkpoints").is_dir() else []
    if len(ckpts) < 2:
        return None
    probe, n = [], 0
    for w in windows:
        if n >= probe_tokens:
            break
        probe.append(w)
        n += len(w[2])
    top1 = []
    for c in ckpts:
        model = load_model(c)
        rec, _ = record(model, probe, batch_size, layers, expert_outputs=False, progress=False)
        top1.append({i: rec.traces[i].arrays()["experts"][:, 0].astype(np.int64) for i in layers})
    final = top1[-1]
    steps = [int(c.name.split("_")[-1]) for c in ckpts]
    return {"steps": steps, "probe_tokens": n,
            "agreement": {str(i): [float((t[i] == final[i]).mean()) for t in top1] for i in layers}}
