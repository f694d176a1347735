"""What every experiment shares: the base run config (full or --quick), shared data, a run per variant.

An experiment trains several variants of one config on the same tokens (the tokenizer is trained once),
each into ``OUT/runs/<variant>``, then writes ``result.json``, ``report.md``/``report.html`` and PNG plots
into ``OUT``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.errors import MoelabError
from moelab.fileio import write_atomic
from moelab.params import count_params
from moelab.presets import tiny
from moelab.train import TrainConfig
from moelab.train.trainer import RunData, prepare_run_data, read_metrics, train


@dataclass
class ExperimentSettings:
    out: Path
    quick: bool = False
    seed: int = 0
    steps: int | None = None  # override the default number of steps
    data: str = "builtin"
    progress: bool = True
    # AoE experiments: how L_aux combines over layers, "sum" (moelab) or "authors" (see experiments/aoe.py)
    aoe_aux: str = "sum"
    force: bool = False  # write into an ``out`` holding someone else's files (nothing is deleted)


def base_config(s: ExperimentSettings) -> TrainConfig:
    """The tiny preset for the full run; a smaller model and fewer steps for --quick (same code path)."""
    if s.quick:
        model = ModelConfig(vocab_size=512, d_model=64, num_layers=2, max_seq_len=64, dense_ffn_dim=128,
                            attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                            moe=MoEConfig(num_experts=8, expert_ffn_dim=64,
                                          router=RouterConfig(top_k=2, load_balance_coef=0.01, z_loss_coef=1e-3)))
        cfg = TrainConfig(model=model, data=s.data, steps=s.steps or 20, batch_size=8, seq_len=64, warmup_steps=5,
                          eval_every=0, eval_batches=2, seed=s.seed, progress=s.progress)
    else:
        cfg = TrainConfig(model=tiny(), data=s.data, steps=s.steps or 300, eval_every=100, eval_batches=8,
                          seed=s.seed, progress=s.progress)
    return cfg


def prepare_out(out: Path, force: bool = False) -> Path:
    """``out`` for an experiment: new, or a directory moelab wrote (or any with ``force``), without an
    experiment's runs in it already."""
    from moelab.checkpoint.atomic import prepare_output_dir

    out = Path(out)
    if (out / "runs").exists() and any((out / "runs").iterdir()):
        raise MoelabError(f"{out} already holds an experiment (runs/ is not empty); choose another --out")
    return prepare_output_dir(out, force=force)


def shared_data(cfg: TrainConfig) -> RunData:
    return prepare_run_data(cfg)


def warm_up(cfg: TrainConfig, steps: int = 2) -> None:
    """Untimed forward/backward passes of the variant's model at the training shape, so that the first
    variant does not pay the process's one-time costs (allocator growth, kernel selection) in its
    tokens/s (issue 24: 1.7k tokens/s for the first variant vs 22-30k for the others)."""
    from moelab.model import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).train()
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len))
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)


def run_variant(name: str, cfg: TrainConfig, out: Path, data: RunData) -> dict:
    """Train one variant; return its final numbers and the per-step history the plots need."""
    cfg = copy.deepcopy(cfg)
    torch.manual_seed(cfg.seed)
    result = train(cfg, out / "runs" / name, data=data)
    records = read_metrics(out / "runs" / name)
    steps = [r for r in records if r["kind"] == "train"]
    tail = steps[-max(len(steps) // 5, 1):]  # the last 20% of steps, for stable averages

    def mean(key: str) -> float | None:
        vals = [r[key] for r in tail if key in r]
        return sum(vals) / len(vals) if vals else None

    def per_layer_mean(values: list[list[float]]) -> list[float] | None:
        values = [v for v in values if v]
        return [sum(col) / len(values) for col in zip(*values)] if values else None

    # the first step of every run pays its own warm-up (optimizer state, compile caches): leave it out
    tps = sorted(r["tokens_per_s"] for r in (steps[1:] or steps))
    count = count_params(cfg.model)
    return {
        "name": name,
        "router": cfg.model.moe.router.type if cfg.model.moe else None,
        "val_loss": result.val["val_loss"],
        "val_ppl": result.val["val_ppl"],
        "val_domains": {d: v["loss"] for d, v in result.val["domains"].items()},
        "train_lm_loss_last20": mean("lm_loss"),
        "max_load_last20": mean("max_load"),
        "load_cv_last20": mean("load_cv"),
        "dropped_frac_last20": mean("dropped_frac"),
        "experts_per_token_last20": mean("experts_per_token_mean"),
        "load_entropy_last20": mean("load_entropy"),
        "router_entropy_last20": mean("router_entropy"),
        # per MoE layer, mean over the last 20% of steps (the AoE paper's Fig. 3 view)
        "load_entropy_per_layer_last20": per_layer_mean([r.get("layers", {}).get("load_entropy") for r in tail]),
        "router_entropy_per_layer_last20": per_layer_mean([r.get("layers", {}).get("router_entropy") for r in tail]),
        "max_load_per_layer_last20": per_layer_mean([r.get("max_load_per_layer") for r in tail]),
        "load_per_layer_last20": [per_layer_mean([r["load"][i] for r in tail if "load" in r])
                                  for i in range(len(tail[-1].get("load", [])))],
        "median_tokens_per_s": tps[len(tps) // 2],
        "total_params": count.total_params,
        "active_params": count.active_params,
        "history": {"step": [r["step"] for r in steps], "lm_loss": [r["lm_loss"] for r in steps],
                    "max_load": [r.get("max_load") for r in steps],
                    "dropped_frac": [r.get("dropped_frac") for r in steps],
                    "experts_per_token": [r.get("experts_per_token_mean") for r in steps]},
    }


def finish(out: Path, experiment: str, s: ExperimentSettings, base: TrainConfig, data: RunData, rows: list[dict],
           report: Callable[[Path, dict], None], extra: dict | None = None) -> dict:
    """Write ``result.json`` (every number) atomically, then the experiment's report; return the result."""
    result = {"experiment": experiment, "quick": s.quick, "seed": s.seed, "steps": base.steps,
              "unigram_entropy": data.unigram_entropy, **(extra or {}), "variants": rows}
    write_atomic(out / "result.json", json.dumps(result, indent=2) + "\n")
    report(out, result)
    return result
