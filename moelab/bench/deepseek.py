"""DeepSeek benchmarks: KV-cache bytes per token for MHA / GQA / MQA / MLA on one model shape (the
formula checked against the tensors a real cache holds), and speculative decoding with the MTP
module (acceptance rate, tokens per main-model forward, speed-up over plain greedy timed side by
side in one process)."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import torch

from moelab.bench.harness import machine
from moelab.config import AttentionConfig, MLAConfig


def bench_kv_cache(seq_len: int = 64, seed: int = 0) -> dict:
    """The deepseek-v3-tiny shape (d_model, layers and heads of the preset) with each attention type:
    MHA, GQA (2 kv heads), MQA, and the preset's MLA."""
    from moelab.model import build_model
    from moelab.presets import get_preset

    base = get_preset("deepseek-v3-tiny")
    base = dataclasses.replace(base, mtp=None)
    heads = base.attention.num_heads
    kinds = {
        "MHA": AttentionConfig(num_heads=heads),
        "GQA": AttentionConfig(num_heads=heads, num_kv_heads=2),
        "MQA": AttentionConfig(num_heads=heads, num_kv_heads=1),
        "MLA": AttentionConfig(num_heads=heads, mla=MLAConfig(kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32,
                                                              qk_rope_head_dim=16, v_head_dim=32)),
    }
    rows = {}
    torch.manual_seed(seed)
    ids = torch.randint(0, base.vocab_size, (1, seq_len))
    for name, attn in kinds.items():
        cfg = dataclasses.replace(base, attention=attn)
        model = build_model(cfg).eval()
        cache = model.new_cache()
        with torch.no_grad():
            model(ids, cache=cache)
        measured = cache.nbytes() // seq_len
        formula = cfg.kv_cache_bytes_per_token(4)
        if measured != formula:
            raise AssertionError(f"{name}: cache holds {measured} bytes per token, the formula says {formula}")
        rows[name] = {"values_per_token": cfg.kv_cache_values_per_token(), "bytes_per_token_fp32": formula,
                      "bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2)}
    for r in rows.values():
        r["vs_mha"] = r["values_per_token"] / rows["MHA"]["values_per_token"]
    return {"benchmark": "kv_cache", "shape": f"d {base.d_model}, {base.num_layers} layers, {heads} heads",
            "rows": rows, "machine": machine()}


def bench_speculative(quick: bool = False, seed: int = 0, steps: int | None = None, new_tokens: int | None = None,
                      reps: int = 3) -> dict:
    """Train deepseek-v3-tiny briefly on the built-in corpus (MTP included), then decode greedily with
    and without MTP drafts, alternating, and check the tokens are the same."""
    from moelab.inference.generate import generate_ids
    from moelab.inference.speculative import speculative_generate_ids
    from moelab.loading import load, load_tokenizer
    from moelab.presets import get_preset
    from moelab.train import TrainConfig, train

    steps = steps or (20 if quick else 300)
    new_tokens = new_tokens or (16 if quick else 64)
    with tempfile.TemporaryDirectory() as tmp:
        train(TrainConfig(model=get_preset("deepseek-v3-tiny"), steps=steps, seed=seed, eval_every=0,
                          progress=False), tmp)
        model, tok = load(tmp).eval(), load_tokenizer(tmp)
    prompts = ["def main(", "The history of", "What is 12 plus 7?"]
    times = {"greedy": [], "speculative": []}
    totals = {"drafted": 0, "accepted": 0, "main_forwards": 0, "new_tokens": 0}
    for _ in range(reps):
        for p in prompts:
            ids = torch.tensor([tok.encode(p)])
            t0 = time.perf_counter()
            ref = generate_ids(model, ids, new_tokens)
            times["greedy"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out, st = speculative_generate_ids(model, ids, new_tokens)
            times["speculative"].append(time.perf_counter() - t0)
            if not torch.equal(out, ref):
                raise AssertionError(f"speculative decoding differs from greedy on {p!r}")
            for k in totals:
                totals[k] += getattr(st, k)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"benchmark": "speculative", "quick": quick, "train_steps": steps, "new_tokens": new_tokens,
            "prompts": prompts, "tokens_equal": True, **totals,
            "acceptance_rate": totals["accepted"] / max(totals["drafted"], 1),
            "tokens_per_forward": totals["new_tokens"] / max(totals["main_forwards"], 1),
            "median_s": med, "speedup": sum(times["greedy"]) / sum(times["speculative"]), "machine": machine()}
