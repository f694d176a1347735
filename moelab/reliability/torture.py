"""Fault injection: kill `moelab train` again and again, resume it each time, and compare the result
with a run that was never interrupted (`moelab ckpt torture`).

Each attempt runs ``moelab train`` in a subprocess (a checkpoint after every step) and ends it with
SIGKILL, either after a random delay or at a chosen moment of a checkpoint save
(``MOELAB_KILL_AT``: weights written, state written, manifest written, mid-rename, before pruning;
see :mod:`moelab.faults`). After every kill every checkpoint on disk must be complete and match its
manifest; the next attempt resumes from the newest one (or starts over when the kill came before
the first). When the kills are spent the run finishes, and its final checkpoint must equal the
uninterrupted run's bit for bit: weights, optimizer state, RNG state, data position, and the
logged losses.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelab.checkpoint.atomic import mark_output_dir
from moelab.errors import MoelabError
from moelab.faults import KILL_ENV, KILL_PHASES
from moelab.fileio import make_dirs


@dataclass
class Attempt:
    index: int
    start_step: int  # step it resumed from (0: a fresh start)
    kill: str  # "timed 1.23s", a phase name, or "none" (ran to the end)
    reached_step: int  # last step logged before it ended
    checkpoints_verified: int = 0
    problems: list[str] = field(default_factory=list)
    lost: dict | None = None  # --power-loss: what the simulated power loss after this attempt took away




def _train_cmd(config: Path, run: Path, resume: bool, journal: Path | None = None) -> list[str]:
    where = ["--resume", str(run)] if resume else ["--out", str(run)]
    # --power-loss: under the shim that journals what each fsync made durable (moelab.reliability.powerloss);
    # its root is the run's parent, so the run directory's own entry must be made durable too
    launcher = (["moelab.cli"] if journal is None
                else ["moelab.reliability.powerloss", str(journal), str(run.parent), "--"])
    return [sys.executable, "-m", *launcher, "train", "--config", str(config), *where, "--no-progress"]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # the same (deterministic) arithmetic in every attempt and the reference
    env.pop(KILL_ENV, None)
    env.update(extra or {})
    return env


def _last_step(run: Path) -> int:
    from moelab.train.trainer import read_metrics

    try:
        recs = read_metrics(run)
    except MoelabError:
        return 0
    return max((r["step"] for r in recs if r.get("kind") == "train"), default=0)


def _verify_all(run: Path) -> tuple[int, list[str]]:
    from moelab.checkpoint.integrity import check_directory
    from moelab.checkpoint.run import check_complete, checkpoint_dirs
    from moelab.errors import CheckpointError

    problems, n = [], 0
    for ckpt in checkpoint_dirs(run):
        n += 1
        try:
            check_complete(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        v = check_directory(ckpt, require_manifest=True)
        problems += [f"{ckpt.name}: {p}" for p in v.problems]
    return n, problems


def _compare(a: Path, b: Path) -> tuple[int, list[str]]:
    """Bytes of tensors compared and every difference between two final checkpoints."""
    from safetensors.torch import load_file

    diffs, nbytes = [], 0
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if set(wa) != set(wb):
        diffs.append("weight names differ")
    for k in sorted(set(wa) & set(wb)):
        nbytes += wa[k].numel() * wa[k].element_size()
        if not torch.equal(wa[k], wb[k]):
            diffs.append(f"weight {k} differs")
    sa = torch.load(a / "trainer_state.pt", map_location="cpu", weights_only=True)
    sb = torch.load(b / "trainer_state.pt", map_location="cpu", weights_only=True)

    def walk(x, y, where):
        nonlocal nbytes
        if torch.is_tensor(x):
            nbytes += x.numel() * x.element_size()
            if not (torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)):
                diffs.append(f"{where} differs")
        elif isinstance(x, dict):
            if set(x) != set(y):
                diffs.append(f"{where}: keys differ")
            for k in x:
                if k in y:
                    walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            if len(x) != len(y):
                diffs.append(f"{where}: lengths differ")
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            diffs.append(f"{where}: {x!r} != {y!r}")

    walk(sa, sb, "trainer_state")
    ja, jb = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
    if ja != jb:
        diffs.append(f"trainer_state.json differs: {ja} vs {jb}")
    return nbytes, diffs


def default_config():
    """A small run on the built-in corpus (2 MoE layers of 4 experts, 80 steps) for the harness."""
    from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
    from moelab.train.config import TrainConfig

    model = ModelConfig(vocab_size=512, d_model=64, num_layers=2, max_seq_len=64, dense_ffn_dim=128,
                        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                        moe=MoEConfig(num_experts=4, expert_ffn_dim=64,
                                      router=RouterConfig(top_k=2, load_balance_coef=0.01, z_loss_coef=1e-3)))
    return TrainConfig(model=model, steps=80, batch_size=8, seq_len=64, warmup_steps=4, eval_batches=1)


def _newest_step(run: Path) -> int:
    from moelab.checkpoint.run import checkpoint_dirs

    return max((int(p.name.split("_")[1]) for p in checkpoint_dirs(run)), default=0)


def _durable_problems(run: Path, newest_before: int, saved: list[int]) -> list[str]:
    """After a simulated power loss: what was durable before the attempt, or published during it (a
    checkpoint whose save returned: ``saved``), must still be there (that checkpoint or a newer one,
    the run's config and tokenizer, a metrics record for every step up to the newest checkpoint)."""
    from moelab.data import Tokenizer
    from moelab.train.config import TrainConfig
    from moelab.train.trainer import read_metrics

    newest = _newest_step(run) if run.is_dir() else 0
    problems = []
    if newest < newest_before:
        problems.append(f"power loss: checkpoint step_{newest_before:06d} was durable before the attempt and is gone")
    elif saved and newest < max(saved):
        left = (f"the newest left is step_{newest:06d}" if newest
                else "no checkpoint is left" if run.is_dir() else "the run directory is gone too")
        problems.append(f"power loss: checkpoint step_{max(saved):06d} was published (its save returned) and is "
                        f"gone; {left}")
    if not newest:
        return problems
    for name, load in (("config.yaml", TrainConfig.load), ("tokenizer.json", Tokenizer.load)):
        try:
            load(run / name)
        except Exception as e:  # noqa: BLE001 - any failure to read it back is the finding
            problems.append(f"power loss: {name} unreadable ({type(e).__name__}: {str(e)[:120]})")
    try:
        logged = {r["step"] for r in read_metrics(run) if r.get("kind") == "train"}
    except Exception as e:  # noqa: BLE001
        return [*problems, f"power loss: metrics.jsonl unreadable ({e})"]
    missing = sorted(set(range(1, newest + 1)) - logged)
    if missing:
        problems.append(f"power loss: metrics.jsonl lost the records of steps {missing[:5]} of checkpoint "
                        f"step_{newest:06d}")
    return problems


def torture(config: Path | None, out: Path, kills: int = 20, seed: int = 0, progress: bool = True,
            power_loss: bool = False) -> dict:
    """Kill and resume a training run ``kills`` times (see the module docstring); returns the result
    and writes result.json, report.md and timeline.png into ``out``. ``power_loss``: each attempt's
    end (the last one's too) is also a simulated power loss (:mod:`moelab.reliability.powerloss`)."""
    from moelab.train.config import TrainConfig
    from moelab.train.trainer import read_metrics

    cfg = TrainConfig.load(config) if config is not None else default_config()
    cfg.save_every, cfg.progress, cfg.eval_every = 1, False, 0  # a checkpoint after every step
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoelabError(f"{out} is a file, not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        raise MoelabError(f"{out} is not empty; choose another --out")
    mark_output_dir(out, "torture")  # .moelab: a directory moelab writes
    run_cfg = out / "torture_config.yaml"
    cfg.save(run_cfg)
    rng = random.Random(seed)

    t0 = time.perf_counter()
    ref = out / "reference"
    proc = subprocess.run(_train_cmd(run_cfg, ref, False), env=_env(), capture_output=True, text=True)
    if proc.returncode:
        raise MoelabError(f"the uninterrupted reference run failed:\n{proc.stderr[-2000:]}")
    ref_seconds = time.perf_counter() - t0

    # --power-loss: the killed run lives in disk/, the root the simulation rebuilds (a directory that
    # exists, durably, before the first attempt, as a user's parent directory would)
    run = out / "disk" / "killed" if power_loss else out / "killed"
    make_dirs(run.parent)
    attempts: list[Attempt] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=kills, desc="kills", unit="kill")
    kinds = [*KILL_PHASES, "timed", "timed"]
    phase_seconds: list[float] = []  # how long an attempt killed inside a save ran: the timed kills' scale
    while True:
        resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*"))
        if not resume and run.exists():
            shutil.rmtree(run)  # killed before its first checkpoint: start over
        start = 0
        if resume:
            from moelab.checkpoint.run import checkpoint_dirs

            start = json.loads((checkpoint_dirs(run)[-1] / "trainer_state.json").read_text())["step"]
        killed = sum(a.kill != "none" for a in attempts)
        if killed >= kills:
            kind, extra, delay = "none", {}, None
        else:
            kind = kinds[killed % len(kinds)] if killed < len(kinds) else rng.choice(kinds)
            extra, delay = {}, None
            if kind == "timed":  # within the first few steps after start-up, like the phase kills
                typical = sorted(phase_seconds)[len(phase_seconds) // 2] if phase_seconds else 0.3 * ref_seconds
                delay = rng.uniform(0.5, 1.5) * typical
            else:
                extra = {KILL_ENV: f"{kind}:{rng.randint(1, 3)}"}
        started = time.perf_counter()
        journal = start_state = None
        if power_loss:
            from moelab.reliability.powerloss import record_start

            journal, start_state = out / "powerloss" / "journal", out / "powerloss" / "start"
            shutil.rmtree(journal, ignore_errors=True)
            record_start(run.parent, start_state)
            newest_before = _newest_step(run) if run.is_dir() else 0
        p = subprocess.Popen(_train_cmd(run_cfg, run, resume, journal), env=_env(extra), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        try:
            _, err = p.communicate(timeout=delay)
            timed_out = False
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            _, err = p.communicate()
            timed_out = True
        label = kind if kind != "timed" else f"timed {delay:.2f}s"
        if kind in KILL_PHASES and p.returncode == -signal.SIGKILL:
            phase_seconds.append(time.perf_counter() - started)
        if kind != "none" and not timed_out and p.returncode == 0:
            label = "none"  # it finished before the kill came
        elif kind != "timed" and kind != "none" and p.returncode != -signal.SIGKILL and p.returncode != 0:
            raise MoelabError(f"attempt {len(attempts)} failed instead of being killed (exit {p.returncode}):\n"
                              f"{err[-2000:]}")
        elif kind == "none" and p.returncode != 0:
            raise MoelabError(f"the final attempt failed (exit {p.returncode}):\n{err[-2000:]}")
        lost = None
        if power_loss:
            from moelab.reliability.powerloss import apply_power_loss

            lost = apply_power_loss(run.parent, start_state, journal)
        a = Attempt(len(attempts), start, label, _last_step(run), lost=lost)
        a.checkpoints_verified, a.problems = _verify_all(run)
        if power_loss:
            from moelab.reliability.powerloss import saved_steps

            a.problems += _durable_problems(run, newest_before, saved_steps(journal))
        attempts.append(a)
        if bar is not None and label != "none":
            bar.update(1)
        if label == "none" and p.returncode == 0:
            break
    if bar is not None:
        bar.close()

    from moelab.checkpoint.run import checkpoint_dirs

    final_ref, finals = checkpoint_dirs(ref)[-1], checkpoint_dirs(run) if run.is_dir() else []
    nbytes, diffs = 0, []
    if finals:
        try:
            nbytes, diffs = _compare(final_ref, finals[-1])
        except Exception as e:  # noqa: BLE001 - e.g. emptied by the power loss: reported, not a crash
            diffs = [f"final checkpoint {finals[-1].name} unreadable ({type(e).__name__}: {str(e)[:120]})"]
    else:  # lost, with a power loss after the last attempt: reported above, nothing to compare
        nbytes, diffs = 0, ["no final checkpoint: the run has no checkpoint left to compare"]
    key = ("step", "loss", "lm_loss", "grad_norm", "aux")
    ref_losses = [{k: r.get(k) for k in key} for r in read_metrics(ref) if r["kind"] == "train"]
    run_losses = ([{k: r.get(k) for k in key} for r in read_metrics(run) if r["kind"] == "train"]
                  if (run / "metrics.jsonl").is_file() else [])
    if ref_losses != run_losses:
        diffs.append("logged training losses differ from the uninterrupted run's")
    unreadable = [p for a in attempts for p in a.problems]
    result = {
        "config": str(config) if config is not None else "built-in torture config", "steps": cfg.steps, "kills": sum(a.kill != "none" for a in attempts),
        "kills_by_kind": _count(a.kill.split()[0] for a in attempts if a.kill != "none"),
        "attempts": [a.__dict__ for a in attempts], "checkpoints_verified": sum(a.checkpoints_verified for a in attempts),
        "unreadable_checkpoints": unreadable, "bytes_compared": nbytes, "differences": diffs,
        "identical": not diffs and not unreadable, "final_step": _last_step(run),
        "reference_seconds": ref_seconds, "seconds": time.perf_counter() - t0,
    }
    if power_loss:
        result["power_loss"] = {k: sum((a.lost or {}).get(k, 0) for a in attempts)
                                for k in ("files_reverted", "files_emptied", "entries_changed")}
        shutil.rmtree(out / "powerloss", ignore_errors=True)
    _write_report(out, result)
    return result


def _count(items) -> dict:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _write_report(out: Path, r: dict) -> None:
    from moelab.reports.writer import md_table, plt, save_figure, write_report

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for a in r["attempts"]:
        color = "tab:green" if a["kill"] == "none" else ("tab:red" if a["kill"].startswith("timed") else "tab:orange")
        ax.plot([a["index"], a["index"]], [a["start_step"], a["reached_step"]], color=color, lw=3)
        ax.plot(a["index"], a["reached_step"], "x" if a["kill"] != "none" else "o", color=color)
    ax.set_xlabel("attempt"), ax.set_ylabel("training step")
    ax.set_title(f"{r['kills']} SIGKILLs (red: random time, orange: inside a checkpoint save), "
                 f"{'identical' if r['identical'] else 'DIFFERENT'} result", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "timeline.png")
    md = ["# moelab ckpt torture", "",
          f"{r['kills']} kills of `moelab train` ({', '.join(f'{k}: {v}' for k, v in r['kills_by_kind'].items())}), "
          f"each followed by a resume; {r['checkpoints_verified']} checkpoint verifications after the kills, "
          f"{len(r['unreadable_checkpoints'])} unreadable; final state vs the uninterrupted run: "
          f"{r['bytes_compared']:,} bytes of tensors compared, "
          f"{'bit-identical' if r['identical'] else 'differences: ' + '; '.join(r['differences'][:5])}.", "",
          md_table(["attempt", "resumed from step", "kill", "last step logged", "checkpoints verified"],
                   [[a["index"], a["start_step"], a["kill"], a["reached_step"], a["checkpoints_verified"]]
                    for a in r["attempts"]]), "", "![timeline](timeline.png)", ""]
    if "power_loss" in r:
        pl = r["power_loss"]
        md[3:3] = [f"Every attempt also ended in a simulated power loss (writes not covered by an fsync discarded, "
                   f"moelab/reliability/powerloss.py): {pl['files_reverted']} files reverted to their last fsynced "
                   f"content, {pl['files_emptied']} emptied, {pl['entries_changed']} directory entries lost or "
                   "restored.", ""]
    write_report(out, "moelab ckpt torture", "\n".join(md), r, json_name="result.json")
