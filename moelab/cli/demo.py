"""`make demo`: build the built-in corpus, train the tiny MoE on CPU, sample from it, write its report
and analyse its routing (`moelab analyze`).

Usage: python -m moelab.cli.demo [--steps N] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEMO_STEPS = 1000


def _fresh_dir(base: Path) -> Path:
    """runs/demo, or runs/demo-2, -3 ... so an earlier demo is never overwritten."""
    if not base.exists():
        return base
    i = 2
    while base.with_name(f"{base.name}-{i}").exists():
        i += 1
    return base.with_name(f"{base.name}-{i}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelab.cli.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from moelab.data import load_corpus
    from moelab.inference.generate import generate
    from moelab.loading import load, load_tokenizer
    from moelab.params import count_params, human
    from moelab.reports.run import write_run_report
    from moelab.train import TrainConfig, train

    t0 = time.time()
    phase = {"t": t0}

    def took() -> str:
        now = time.time()
        dt, phase["t"] = now - phase["t"], now
        return f"({dt:.0f} s)"

    print("[1/5] building the built-in corpus (cached after the first build)")
    corpus = load_corpus("builtin")
    for dom in corpus.domains:
        n = sum(d.domain == dom for d in corpus.train)
        chars = sum(len(d.text) for d in corpus.train if d.domain == dom)
        print(f"      {dom:<8} {n:>6} train documents, {chars / 1e6:.2f}M characters")

    print(f"      {took()}")
    cfg = TrainConfig(steps=args.steps, eval_every=max(args.steps // 4, 1))
    count = count_params(cfg.model)
    run_dir = _fresh_dir(Path(args.out))
    print(f"[2/5] training the tiny MoE ({human(count.total_params)} total / {human(count.active_params)} active "
          f"parameters, {cfg.model.moe.num_experts} experts top-{cfg.model.moe.router.top_k}) "
          f"for {cfg.steps} steps into {run_dir}")
    result = train(cfg, run_dir)
    val = result.val["val_loss"]
    print(f"      validation loss {val:.3f} nats/token vs unigram entropy {result.unigram_entropy:.3f} nats/token "
          f"({'learned: far below' if val < result.unigram_entropy - 0.5 else 'NOT clearly below'} the unigram baseline) "
          f"{took()}")

    print("[3/5] sampling from the trained model")
    model, tok = load(run_dir), load_tokenizer(run_dir)
    for prompt in ("def ", "The ", "Solve "):
        text = generate(model, tok, prompt, max_new_tokens=40, temperature=0.7, top_k=40, seed=0)
        print(f"      {prompt!r} -> {(prompt + text)[:120]!r}")
    print(f"      {took()}")

    print("[4/5] writing the report")
    paths = write_run_report(run_dir)
    print(f"      {took()}")
    print("[5/5] analysing the routing: moelab analyze on 100k tokens of the built-in corpus")
    from moelab.analysis import analyze

    analysis = analyze(run_dir, run_dir / "analysis", data="builtin", max_tokens=100_000)
    print(f"      analysed {analysis['tokens']:,} tokens {took()}")
    print(f"done in {time.time() - t0:.0f} s. Report: {paths['md'].resolve()}")
    print(f"                          {paths['html'].resolve()}")
    print(f"                Analysis: {Path(analysis['report']).resolve()}")
    return 0 if val < result.unigram_entropy else 1


if __name__ == "__main__":
    sys.exit(main())
