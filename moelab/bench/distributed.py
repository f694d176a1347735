"""`moelab bench distributed`: training throughput of 1 process vs N processes on this machine, and the
share of each step that N processes spend in all-to-all.

Each contender is a real ``moelab train`` run (N processes through ``--nproc``) of the same config
and global batch; the runs alternate (1, N, 1, N, ...) so drift in the machine's speed hits both,
and each run's steady tokens/s is the median over its steps after the first (which pays for
warm-up). The losses of the runs are checked equal first: a faster wrong run is not a result.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from moelab.errors import MoelabError

LAYOUTS = {  # name -> (processes, train flags)
    "fsdp": (2, ["--parallel.ep", "1"]),
    "ep": (2, ["--parallel.ep", "2"]),
}


def _run(out: Path, nproc: int, flags: list[str], steps: int, seed: int, threads: int | None) -> list[dict]:
    cmd = [sys.executable, "-m", "moelab.cli", "train", "--preset", "tiny", "--steps", str(steps),
           "--eval-every", "0", "--eval-batches", "1", "--warmup-steps", "2", "--seed", str(seed), "--no-progress",
           "--out", str(out), *flags]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = dict(os.environ)
    cores = threads or os.cpu_count() or 1
    env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))  # the same cores, split between the processes
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise MoelabError(f"bench distributed: `{' '.join(cmd[2:])}` failed:\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip() and json.loads(line)["kind"] == "train"]


def bench_distributed(reps: int = 2, steps: int = 12, quick: bool = False, seed: int = 0,
                      threads: int | None = None) -> dict:
    from moelab.bench.harness import machine

    if quick:
        reps, steps = 1, 4
    rows: dict[str, dict] = {}
    single: list[float] = []
    losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="moelab-bench-dist-") as tmp:
        for rep in range(reps):
            recs = _run(Path(tmp) / f"one_{rep}", 1, [], steps, seed, threads)
            single.append(statistics.median(r["tokens_per_s"] for r in recs[1:]))
            losses["1 process"] = [r["loss"] for r in recs]
            for name, (n, flags) in LAYOUTS.items():
                recs = _run(Path(tmp) / f"{name}_{rep}", n, flags, steps, seed, threads)
                row = rows.setdefault(name, {"processes": n, "flags": " ".join(flags), "tokens_per_s": [],
                                             "a2a_frac": []})
                row["tokens_per_s"].append(statistics.median(r["tokens_per_s"] for r in recs[1:]))
                row["a2a_frac"].append(statistics.median(max(r["parallel"]["a2a_frac"]) for r in recs[1:]))
                losses[name] = [r["loss"] for r in recs]
    ref = losses["1 process"]
    for name, got in losses.items():
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
        if worst > 1e-4:
            raise MoelabError(f"bench distributed: the {name} run's losses differ from one process's by {worst:.1e} "
                              "(relative); not timing a wrong result")
    one = statistics.median(single)
    for row in rows.values():
        row["tokens_per_s_median"] = statistics.median(row["tokens_per_s"])
        row["speedup_vs_1"] = row["tokens_per_s_median"] / one
        row["a2a_frac_median"] = statistics.median(row["a2a_frac"])
    return {"machine": machine(), "preset": "tiny", "steps": steps, "reps": reps,
            "single_tokens_per_s": single, "single_tokens_per_s_median": one, "layouts": rows,
            "losses_equal": True}
