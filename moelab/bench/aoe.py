"""`moelab bench aoe`: AoE's training throughput and activation memory against the router-based MoE of
the same active budget, side by side in one process (the AoE paper's Table 4 view; it reports
0.93-0.97x throughput on GPUs).

The MoE is a preset (default ``tiny``); the AoE model is the same config with AoE experts of the given
``d_low`` (default d_model / 4) and d_wide from eq. 5, so both have the same parameters per expert.
Both start from the same seed with fresh weights and train on the same random batch.
"""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import torch

from moelab.bench.sidebyside import measure_training_steps, ratios_to
from moelab.config import AoEConfig
from moelab.errors import ConfigError
from moelab.model import build_model
from moelab.presets import get_preset


def bench_aoe(preset: str = "tiny", d_low: int | None = None, batch_size: int = 16, seq_len: int = 128,
              reps: int = 7, seed: int = 0, threads: int | None = None) -> dict:
    moe_cfg = get_preset(preset)
    if moe_cfg.moe is None or moe_cfg.moe.aoe is not None:
        raise ConfigError("preset", preset, "needs a router-based MoE preset (e.g. tiny) to compare AoE against")
    d_low = d_low or max(1, moe_cfg.d_model // 4)
    aoe_cfg = copy.deepcopy(moe_cfg)
    aoe_cfg.moe.aoe = AoEConfig(d_low=d_low)
    aoe_cfg.__post_init__()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    models = {"moe": build_model(moe_cfg), "aoe": build_model(aoe_cfg)}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, moe_cfg.vocab_size, (batch_size, min(seq_len, moe_cfg.max_seq_len)), generator=g)
    timing = measure_training_steps(models, ids, ids, reps=reps, warmup=2)
    ratios = ratios_to(timing, "moe")
    return {"benchmark": "aoe", "preset": preset, "d_low": d_low, "d_wide": aoe_cfg.aoe_d_wide,
            "d_model": moe_cfg.d_model, "batch_size": batch_size, "seq_len": ids.shape[1], "reps": reps,
            "seed": seed, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "models": timing,
            "aoe_tokens_per_s_ratio": ratios["aoe"]["tokens_per_s_ratio"],
            "aoe_activation_bytes_ratio": ratios["aoe"]["activation_bytes_ratio"]}


def write_bench(result: dict, out: Path, force: bool = False) -> None:
    import json

    from moelab.fileio import write_atomic
    from moelab.checkpoint.atomic import prepare_output_dir
    from moelab.reports.writer import md_table, write_report

    out = prepare_output_dir(out, force=force)  # new or moelab's, else only with force
    write_atomic(out / "result.json", json.dumps(result, indent=2) + "\n")
    rows = [[n, r["tokens_per_s"], r["activation_bytes"]] for n, r in result["models"].items()]
    md = (f"# AoE vs MoE training step ({result['preset']}, d_low {result['d_low']}, d_wide {result['d_wide']})\n\n"
          + md_table(["model", "tokens/s", "activation bytes"], rows)
          + f"\n\nAoE / MoE: tokens/s {result['aoe_tokens_per_s_ratio']:.3f}, activation memory "
          f"{result['aoe_activation_bytes_ratio']:.3f} (side by side, {result['reps']} interleaved repetitions, "
          f"{result['threads']} threads).\n")
    write_report(out, "moelab bench aoe", md, result, force=force)
