"""A training run's checkpoints: ``RUN/checkpoints/step_N/`` directories listed, verified, chosen,
pruned and recovered after a crash (file names in :mod:`moelab.checkpoint.layout`). Saving them is
:mod:`moelab.checkpoint.trainer_state` (one process) or :mod:`moelab.checkpoint.distributed` (DCP).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

from moelab.checkpoint.dcp_metadata import check_dcp_files
from moelab.checkpoint.integrity import ALLOW_ENV, MANIFEST, allow_unverified_default, verify_directory
from moelab.checkpoint.layout import CHECKPOINTS, DCP_DIR, REQUIRED, REQUIRED_DCP
from moelab.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temp dirs are never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; each is renamed to a hidden temp name
    first, so a crash mid-delete never leaves a visible, partly deleted checkpoint."""
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        hidden = old.with_name(f".{old.name}.tmp-prune")
        try:
            os.replace(old, hidden)
        except OSError:
            continue
        shutil.rmtree(hidden, ignore_errors=True)


def set_aside_newer(run_dir: Path, chosen: Path) -> list[str]:
    """Resuming from ``chosen`` abandons the checkpoints after it (they failed verification, or
    belong to a future that is being redone): rename them ``corrupt_step_N`` so pruning can never
    keep them in place of new, intact ones. Returns what was moved."""
    moved = []
    step = int(_STEP_DIR.match(chosen.name).group(1))
    for d in checkpoint_dirs(run_dir):
        if int(_STEP_DIR.match(d.name).group(1)) > step:
            target = d.with_name(f"corrupt_{d.name}")
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(d, target)
            moved.append(f"{d.name} -> {target.name}")
    return moved


_HIDDEN = re.compile(r"^\.(step_\d+)\.(tmp|old)-")


def recover_checkpoints(run_dir: Path) -> list[str]:
    """After a crash: a checkpoint moved aside while being replaced by a new save of the same step
    (``.step_N.old-*``) is put back when the new one never arrived; unfinished temp directories are
    deleted. Returns what was done. Call on resume, in one process (rank 0)."""
    root = Path(run_dir) / CHECKPOINTS
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        m = _HIDDEN.match(p.name)
        if not m or not p.is_dir():
            continue
        target = root / m.group(1)
        if m.group(2) == "old" and not target.exists():
            os.replace(p, target)
            done.append(f"restored {target.name} (its replacement was interrupted)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed unfinished {p.name}")
    return done


def _assess(ckpt: Path, allow_unverified: bool, part: tuple[int, int] | None) -> tuple[str, str, str | None]:
    """("ok" | "unverified" | "bad", why, the SHA-256 of the manifest read) for one checkpoint: complete
    and matching its manifest, or without a manifest, or incomplete/corrupt/malformed (this process's
    ``part`` of the hashing). Nothing raises: any failure (a disk error, a file of the wrong shape) is
    "bad" with its reason, so every process reaches the next collective."""
    try:
        check_complete(ckpt)
        v = verify_directory(ckpt, allow_unverified=True, part=part)
    except CheckpointError as e:
        return "bad", str(e), None
    except Exception as e:  # unreadable (a disk error, a permission), or damaged beyond what is checked
        return "bad", f"{ckpt}: {type(e).__name__}: {e}", None
    if not v.has_manifest and not allow_unverified:
        return "unverified", (f"{MANIFEST} is missing (every checkpoint moelab writes has one: lost or removed; "
                              f"{ALLOW_ENV}=1 accepts checkpoints from before manifests)"), None
    return "ok", "", v.manifest_sha256


def _worst(results: list[tuple]) -> tuple[str, str]:
    """One verdict from every process's: any "bad" is bad; processes that read different manifests (each
    hashed its share of its own view, so a file may have been hashed by none) are bad; then any
    "unverified"."""
    for r in results:
        if r[0] == "bad":
            return "bad", r[1]
    if len({r[2] if len(r) > 2 else None for r in results}) > 1:
        return "bad", (f"the processes read different {MANIFEST} files (a stale network-filesystem copy, or "
                       "node-local disks), so their shares of the hashing do not cover the checkpoint")
    for r in results:
        if r[0] == "unverified":
            return "unverified", r[1]
    return "ok", ""


def latest_checkpoint(run_dir: Path, verify: bool = True, allow_unverified: bool | None = None,
                      part: tuple[int, int] | None = None, combine=None, names: list[str] | None = None,
                      warn: bool = True) -> Path:
    """The newest complete checkpoint whose files match its manifest; a newer one that is incomplete,
    corrupt or has a malformed manifest is skipped with a warning naming it and why. One without a
    manifest (lost or removed) is unverified: an older verified one is preferred, and when none is
    verified the newest unverified one is taken with a warning; ``allow_unverified`` (default
    ``MOELAB_ALLOW_UNVERIFIED``) accepts it like a verified one (checkpoints from before manifests).

    Several processes choose together (:func:`choose_checkpoint`): ``names`` is rank 0's listing,
    ``part`` this process's share of the hashing and ``combine`` merges every process's verdict on a
    candidate into one, so every process takes the same path; ``warn``: this process reports."""
    notes: list[str] = []
    try:
        return _latest(run_dir, verify, allow_unverified, part, combine, names, notes)
    finally:
        for note in notes if warn else ():
            warnings.warn(note, stacklevel=2)


def _latest(run_dir: Path, verify: bool, allow_unverified: bool | None, part: tuple[int, int] | None, combine,
            names: list[str] | None, notes: list[str]) -> Path:
    """:func:`latest_checkpoint`, its warnings appended to ``notes`` (issued by the caller: between two
    collectives a warning may raise, under ``-W error``, on one process alone)."""
    allow = allow_unverified_default() if allow_unverified is None else allow_unverified
    root = Path(run_dir) / CHECKPOINTS
    dirs = [root / n for n in names] if names is not None else checkpoint_dirs(run_dir)
    try:  # an interrupted re-save left the old copy aside: say so (resuming repairs it)
        hidden = sorted(root.iterdir()) if root.is_dir() else []
    except OSError:
        hidden = []
    for p in hidden:
        m = _HIDDEN.match(p.name)
        if m and m.group(2) == "old" and not (root / m.group(1)).exists():
            notes.append(f"{root}: {m.group(1)} was being replaced when a process died (its previous copy is "
                         f"{p.name}); resume the run to restore it")
    if not dirs:
        raise CheckpointError(f"{run_dir}: no checkpoint in {CHECKPOINTS}/; train with --save-every or let a run finish")
    if not verify:
        return dirs[-1]
    skipped, unverified = [], []
    for ckpt in reversed(dirs):
        verdict = _assess(ckpt, allow, part)
        status, why = combine(verdict) if combine is not None else verdict[:2]
        if status == "bad":
            skipped.append(f"{ckpt.name} ({why})")
            notes.append(f"skipping checkpoint {ckpt}: {why}")
            continue
        if status == "unverified":
            unverified.append((ckpt, why))
            continue
        for newer, reason in unverified:
            notes.append(f"skipping checkpoint {newer}: {reason}; taking the older, verified {ckpt.name}")
        return ckpt
    if unverified:
        ckpt, reason = unverified[0]
        notes.append(f"no verified checkpoint in {run_dir}: taking {ckpt} UNVERIFIED ({reason})")
        return ckpt
    raise CheckpointError(f"{run_dir}: no intact checkpoint; every one failed verification: {'; '.join(skipped)}")


def choose_checkpoint(run_dir: Path, env=None, set_aside: bool = False, missing_ok: bool = False) -> Path | None:
    """The checkpoint to resume or roll back to, the same on every process: rank 0 lists the candidates,
    every rank hashes its share of each (about 1/world of its bytes) until all agree one is intact,
    and rank 0 alone sets newer ones aside (``set_aside``, on resume), after every rank has finished
    reading. ``env``: the DistEnv (None: one process). ``missing_ok``: None when rank 0 finds no
    checkpoint at all (on every process: no process decides from its own listing), instead of raising.

    A failure on one process alone (rank 0's listing or renaming, any rank's reading) is broadcast and
    raised on every process at once, as a CheckpointError, never left for the others to wait out
    ``parallel.timeout_s``; rank 0 warns only after the last collective."""
    if env is None or env.world <= 1:
        if missing_ok and not checkpoint_dirs(run_dir):
            return None
        ckpt = latest_checkpoint(run_dir)
        if set_aside:
            for line in set_aside_newer(run_dir, ckpt):
                warnings.warn(f"{run_dir}: resuming from {ckpt.name}; set aside {line}", stacklevel=2)
        return ckpt
    import torch.distributed as dist

    def from_main(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    listing = None
    if env.is_main:
        try:
            listing = [d.name for d in checkpoint_dirs(run_dir)]
        except Exception as e:  # the others are waiting for the list
            listing = f"could not list {Path(run_dir) / CHECKPOINTS}: {type(e).__name__}: {e}"
    listing = from_main(listing)
    if isinstance(listing, str):
        raise CheckpointError(f"{run_dir}: {listing}")
    if missing_ok and not listing:
        return None

    def combine(verdict):
        every = [None] * env.world
        dist.all_gather_object(every, verdict)
        return _worst(every)

    notes: list[str] = []
    error = ckpt = None
    try:
        ckpt = _latest(run_dir, True, None, (env.rank, env.world), combine, listing, notes)
    except CheckpointError as e:  # the same on every rank: every verdict was combined
        error = e
    failed = None
    if error is None and set_aside and env.is_main:
        try:
            for line in set_aside_newer(run_dir, ckpt):
                notes.append(f"{run_dir}: resuming from {ckpt.name}; set aside {line}")
        except Exception as e:  # the others are waiting: tell them
            failed = (f"{run_dir}: could not set aside the checkpoints after {ckpt.name} ({type(e).__name__}: {e}); "
                      "move them out of checkpoints/ by hand and resume again")
    failed = from_main(failed)  # also the barrier: no rank reads while rank 0 renames
    for note in notes if env.is_main else ():
        warnings.warn(note, stacklevel=2)
    if failed:
        raise CheckpointError(failed)
    if error is not None:
        raise error
    return ckpt


def is_distributed(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR).is_dir()


def check_complete(ckpt: Path) -> None:
    """Raise CheckpointError unless every file a checkpoint needs is there: for a distributed one, every
    shard its ``dcp/.metadata`` names and every rank's RNG file, each listed in the manifest."""
    ckpt = Path(ckpt)
    missing = [name for name in (REQUIRED_DCP if is_distributed(ckpt) else REQUIRED) if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint is missing {', '.join(missing)}; "
                              "resume from an earlier checkpoint (delete this one) or retrain")
    if is_distributed(ckpt):
        check_dcp_files(ckpt)


def resolve_checkpoint(path: str | os.PathLike, allow_unverified: bool | None = None) -> Path:
    """A run directory -> its latest complete checkpoint; a checkpoint directory -> itself."""
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        # complete and verified, newer corrupt ones skipped with a warning
        return latest_checkpoint(path, allow_unverified=allow_unverified)
    check_complete(path)
    return path
