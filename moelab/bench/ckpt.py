"""`moelab bench ckpt`: what a checkpoint costs on this machine, and what it would cost per rank for a
671B-parameter model at expert parallelism 64.

Measured in one process, in a temp directory on the disk of ``--dir`` (default: the system's temp):

- **save**: moelab's checkpoint of a model and its AdamW state in both formats: the distributed one
  (``save_distributed_checkpoint`` on a process group of one: DCP shards written and fsynced, every
  file SHA-256 hashed by its writer, the manifest, the directory renamed into place), which the
  projection uses, and the single-process one (``save_checkpoint``: safetensors weights and
  ``torch.save`` of the optimizer state): seconds per GB of checkpoint;
- **verify**: ``check_directory`` of the distributed checkpoint (every byte read and hashed again):
  seconds per GB;
- **sha256**: ``hashlib.sha256`` over an in-memory buffer (one core): GB/s, the ceiling of verification;
- **disk write / read**: one file of the checkpoint's size written and fsynced, then read back after its
  pages are dropped from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``, this file only): GB/s.

Projection (every assumption is in result.json): moelab saves the fp32 weights plus AdamW's ``exp_avg``
and ``exp_avg_sq`` (fp32, the parameter's dtype), so about 12 bytes per parameter; the bytes per
parameter used are the ones measured here (checkpoint bytes / parameters). DeepSeek-V3 (671e9
parameters) on 64 ranks with EP 64 and FSDP over the same ranks spreads every tensor evenly, so one rank
writes ``bytes_per_rank = 671e9 x bytes_per_param / 64``, and

    projected_save_s   = bytes_per_rank / save_GBps      (every rank writes and hashes its own shards)
    projected_verify_s = bytes_per_rank / verify_GBps    (on resume every rank hashes a 1/64 share)
    rank0_alone_s      = total_bytes / verify_GBps       (before issue 23: rank 0 hashed every shard)

with the GB/s of this machine's disk and one core's hashing (a GPU node's NVMe and CPUs differ: rerun
this there). ``rank0_alone_s`` is compared with the default ``parallel.timeout_s`` (300 s) the other
ranks waited under.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

GB = 1e9
PROJECTED_PARAMS = 671e9  # DeepSeek-V3's total parameters (the MTP module's 14B not counted)
PROJECTED_RANKS = 64  # EP 64: one expert group of 4 experts (256 routed) per rank, FSDP over the same ranks
TIMEOUT_S = 300.0  # parallel.timeout_s default: how long a collective waits for a peer


def _model(quick: bool):
    from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
    from moelab.model import build_model

    d = 96 if quick else 512
    cfg = ModelConfig(vocab_size=1024, d_model=d, num_layers=2, max_seq_len=128, dense_ffn_dim=4 * d,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                      moe=MoEConfig(num_experts=8, expert_ffn_dim=2 * d, router=RouterConfig(top_k=2)))
    torch.manual_seed(0)
    return build_model(cfg), cfg


def _trained_state(model, cfg):
    """AdamW after one step (its exp_avg and exp_avg_sq exist, as in any checkpoint after step 1)."""
    from moelab.train.config import TrainConfig
    from moelab.train.trainer import lr_lambda, make_optimizer

    run_cfg = TrainConfig(model=cfg, steps=10, warmup_steps=1, save_every=1, progress=False)
    opt = make_optimizer(model, run_cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(run_cfg))
    return run_cfg, opt, sched


def _sha256_gbps(nbytes: int, reps: int) -> float:
    buf = os.urandom(min(nbytes, 256 * 2**20))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        hashlib.sha256(buf).hexdigest()
        times.append(time.perf_counter() - t)
    return len(buf) / statistics.median(times) / GB


def _disk_gbps(directory: Path, nbytes: int, reps: int) -> tuple[float, float]:
    """(write + fsync GB/s, cold read GB/s) of one file of ``nbytes``."""
    chunk = os.urandom(4 * 2**20)
    writes, reads = [], []
    path = directory / "disk_probe.bin"
    for _ in range(reps):
        t = time.perf_counter()
        with open(path, "wb") as f:
            left = nbytes
            while left > 0:
                f.write(chunk[:min(left, len(chunk))])
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
        writes.append(time.perf_counter() - t)
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):  # this file's pages out of the cache: a cold read
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            while os.read(fd, 8 * 2**20):
                pass
            reads.append(time.perf_counter() - t)
        finally:
            os.close(fd)
        path.unlink()
    return nbytes / statistics.median(writes) / GB, nbytes / statistics.median(reads) / GB


class _OneRank:
    """The DistEnv of a process group of one (save_distributed_checkpoint's collectives run on it)."""

    rank, world, dp, ep, is_main = 0, 1, 1, 1, True

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def _timed_saves(run_dir: Path, reps: int, save) -> tuple[list[float], list[float], Path]:
    from moelab.checkpoint.integrity import check_directory

    save_s, verify_s = [], []
    for rep in range(reps):
        t = time.perf_counter()
        ckpt = save(run_dir, rep + 1)
        save_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        v = check_directory(ckpt)
        verify_s.append(time.perf_counter() - t)
        if not v.ok:
            raise RuntimeError(f"bench ckpt: the checkpoint just saved fails verification: {v.problems}")
    return save_s, verify_s, ckpt


def _bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())


def bench_ckpt(quick: bool = False, reps: int | None = None, directory: str | os.PathLike | None = None) -> dict:
    import torch.distributed as dist

    from moelab.bench.harness import machine
    from moelab.checkpoint.distributed import save_distributed_checkpoint
    from moelab.checkpoint.trainer_state import DataPosition, save_checkpoint
    from moelab.data.tokenizer import train_tokenizer

    reps = reps or (1 if quick else 3)
    model, cfg = _model(quick)
    params = sum(p.numel() for p in model.parameters())
    run_cfg, opt, sched = _trained_state(model, cfg)
    tok = train_tokenizer(["moelab bench ckpt: the tokenizer saved with every checkpoint"] * 4, vocab_size=300)
    if dist.is_initialized():
        raise RuntimeError("bench ckpt runs in one process; it starts its own process group of one")
    with tempfile.TemporaryDirectory(prefix="moelab-bench-ckpt-", dir=directory) as tmp:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            save_s, verify_s, ckpt = _timed_saves(Path(tmp) / "dcp", reps, lambda d, step: save_distributed_checkpoint(
                d, step, model, opt, sched, DataPosition(), run_cfg, tok, 1, _OneRank()))
        finally:
            dist.destroy_process_group()
        nbytes = _bytes(ckpt)
        single_s, _, single = _timed_saves(Path(tmp) / "single", reps, lambda d, step: save_checkpoint(
            d, step, model, opt, sched, DataPosition(), run_cfg, tok, keep_last=1))
        single_bytes = _bytes(single)
        write_gbps, read_gbps = _disk_gbps(Path(tmp), nbytes, reps)
    sha_gbps = _sha256_gbps(nbytes, max(reps, 3))
    save_gbps = nbytes / statistics.median(save_s) / GB
    verify_gbps = nbytes / statistics.median(verify_s) / GB
    single_gbps = single_bytes / statistics.median(single_s) / GB
    bytes_per_param = nbytes / params
    total = PROJECTED_PARAMS * bytes_per_param
    per_rank = total / PROJECTED_RANKS
    return {
        "machine": machine(), "quick": quick, "reps": reps, "params": params, "checkpoint_bytes": nbytes,
        "bytes_per_param": bytes_per_param,
        "format": "dcp (the distributed checkpoint, 1 rank)", "save_s": save_s, "verify_s": verify_s,
        "save_s_per_gb": 1 / save_gbps, "verify_s_per_gb": 1 / verify_gbps,
        "save_gbps": save_gbps, "verify_gbps": verify_gbps, "sha256_gbps": sha_gbps,
        "single_process_bytes": single_bytes, "single_process_save_s": single_s,
        "single_process_save_gbps": single_gbps,
        "disk_write_gbps": write_gbps, "disk_read_gbps": read_gbps,
        "projection": {
            "params": PROJECTED_PARAMS, "ranks": PROJECTED_RANKS, "ep": PROJECTED_RANKS,
            "assumptions": "moelab's saved state per parameter as measured here (fp32 weights + AdamW exp_avg and "
                           "exp_avg_sq, fp32); every tensor spread evenly over the ranks (EP 64 for the experts, "
                           "FSDP over the same 64 ranks for the rest); this machine's disk and one core's "
                           "SHA-256 per rank",
            "formula": "bytes_per_rank = params * bytes_per_param / ranks; save_s = bytes_per_rank / save_gbps; "
                       "verify_s = bytes_per_rank / verify_gbps; rank0_alone_s = total_bytes / verify_gbps",
            "total_bytes": total, "bytes_per_rank": per_rank,
            "save_s_per_rank": per_rank / (save_gbps * GB), "verify_s_per_rank": per_rank / (verify_gbps * GB),
            "rank0_alone_s": total / (verify_gbps * GB), "timeout_s": TIMEOUT_S,
        },
    }


def summary(r: dict) -> list[str]:
    p = r["projection"]
    return [f"ckpt: {r['checkpoint_bytes'] / 1e6:.1f} MB checkpoint ({r['bytes_per_param']:.2f} bytes/param): save "
            f"{r['save_s_per_gb']:.2f} s/GB, verify {r['verify_s_per_gb']:.2f} s/GB; sha256 {r['sha256_gbps']:.2f} GB/s, "
            f"disk write {r['disk_write_gbps']:.2f} GB/s, read {r['disk_read_gbps']:.2f} GB/s",
            f"ckpt: 671B at EP {p['ranks']}: {p['bytes_per_rank'] / 1e9:.0f} GB per rank, save {p['save_s_per_rank']:.0f} s "
            f"and verify {p['verify_s_per_rank']:.0f} s per rank (each rank its own share); rank 0 hashing all "
            f"{p['total_bytes'] / 1e12:.1f} TB alone: {p['rank0_alone_s']:.0f} s vs a {p['timeout_s']:.0f} s timeout"]


def write_bench(r: dict, out: Path, force: bool = False) -> None:
    """result.json, report.md / report.html and throughput.png in ``out`` (new or written by moelab,
    else only with ``force``)."""
    import json

    import matplotlib.pyplot as plt

    from moelab.fileio import write_atomic
    from moelab.checkpoint.atomic import prepare_output_dir
    from moelab.reports.writer import md_table, save_figure, write_report

    out = prepare_output_dir(out, force=force)
    write_atomic(out / "result.json", json.dumps(r, indent=2) + "\n")
    rates = {"sha256 (memory, 1 core)": r["sha256_gbps"], "disk write + fsync": r["disk_write_gbps"],
             "disk read (cold)": r["disk_read_gbps"], "save (distributed format)": r["save_gbps"],
             "save (single-process format)": r["single_process_save_gbps"], "verify": r["verify_gbps"]}
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(list(rates), list(rates.values()), color=["#888", "#48a", "#48a", "#c62", "#c62", "#c62"])
    ax.set_xlabel("GB/s")
    ax.invert_yaxis()
    save_figure(fig, out / "throughput.png")
    p = r["projection"]
    md = (f"# Checkpoint save and verify cost ({r['machine']['processor']}, torch {r['machine']['torch']})\n\n"
          f"A moelab checkpoint of {r['params']:,} parameters with its AdamW state: {r['checkpoint_bytes']:,} bytes "
          f"({r['bytes_per_param']:.2f} bytes per parameter), median of {r['reps']}.\n\n"
          + md_table(["measure", "GB/s", "s per GB"], [[k, v, 1 / v] for k, v in rates.items()])
          + "\n\n![throughput](throughput.png)\n\n"
          f"## Projection: {p['params'] / 1e9:.0f}B parameters at EP {p['ep']} ({p['ranks']} ranks)\n\n"
          f"Assumptions: {p['assumptions']}.\n\n```\n{p['formula']}\n```\n\n"
          + md_table(["quantity", "value"], [["total checkpoint bytes", f"{p['total_bytes']:.3e}"],
                                             ["bytes per rank", f"{p['bytes_per_rank']:.3e}"],
                                             ["save per rank (s)", p["save_s_per_rank"]],
                                             ["verify per rank on resume (s)", p["verify_s_per_rank"]],
                                             ["rank 0 hashing every shard alone (s)", p["rank0_alone_s"]],
                                             ["parallel.timeout_s default (s)", p["timeout_s"]]])
          + "\n")
    write_report(out, "moelab bench ckpt", md, r, json_name="report.json", force=force)
