"""What a resumed run reads, and why it trusts it.

The run directory's ``config.yaml`` and ``tokenizer.json`` are in no manifest: an edit, a bad disk or
a half-written file would be adopted silently. A resume therefore reads the copies inside the
checkpoint it resumes from (``run_config.yaml`` and ``tokenizer.json``, verified against the
checkpoint's manifest) and warns, naming the file, when the run-level copy differs.

The data files a run trains on are fingerprinted into every checkpoint (``trainer_state.json``,
``data_files``: size, modification time and SHA-256 of each file; for a file over
:data:`FULL_HASH_LIMIT`, of its first and last MiB): a resume on changed data would not continue the
same run, so it is refused unless ``allow_data_change`` (``--allow-data-change``) says otherwise.
The built-in corpus is generated from the running Python's standard library: it is fingerprinted as
one entry (:data:`BUILTIN_KEY`: its documents' size and SHA-256, the corpus version, Python version
and build settings). A fingerprint is computed once per process while the file keeps its inode,
size, modification and change time.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

from moelab.checkpoint.layout import STATE_JSON
from moelab.checkpoint.integrity import MANIFEST, verify_file
from moelab.checkpoint.run import check_complete, checkpoint_dirs
from moelab.data.userdata import text_files
from moelab.errors import CheckpointError, MoelabError
from moelab.train.config import RUN_CONFIG, TrainConfig, config_differences, non_resumable

DATA_KEY = "data_files"  # in a checkpoint's trainer_state.json
FULL_HASH_LIMIT = 64 * 2**20  # bytes: files up to this size are hashed whole
_MIB = 2**20
BUILTIN_KEY = "builtin corpus"  # the built-in corpus's entry in a fingerprint's files
RACY_NS = 2 * 10**9  # a file changed this recently may change again within its timestamps' resolution
_PRINTS: dict[tuple, dict] = {}  # (path, device, inode, size, mtime_ns, ctime_ns) -> fingerprint, this process
__all__ = ["DATA_KEY", "RESUME_FILES", "check_data_unchanged", "data_fingerprint", "resume_checkpoint", "resumed_config",
           "resumed_tokenizer"]


RESUME_FILES = ("run_config.yaml", "tokenizer.json", STATE_JSON)  # what a resume reads before the weights


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` with a manifest whose files a resume reads first
    (:data:`RESUME_FILES`) match it, or None (no such checkpoint: the trainer then reports why). Only
    these small files are hashed here, in every process; the trainer verifies the whole checkpoint
    it loads (:func:`moelab.checkpoint.run.choose_checkpoint`)."""
    for ckpt in reversed(checkpoint_dirs(Path(run_dir))):
        try:
            check_complete(ckpt)
            if not (ckpt / MANIFEST).is_file():
                continue  # unverified: the trainer decides whether to take it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name in RESUME_FILES:
                    verify_file(ckpt, name)
        except CheckpointError:
            continue  # the trainer reports it when it chooses
        return ckpt
    return None


def resumed_config(run_dir: Path, ckpt: Path | None, warn: bool = True) -> tuple[TrainConfig, Path]:
    """(run config, the file it came from): the checkpoint's verified ``run_config.yaml``, else (no
    checkpoint yet) the run's ``config.yaml``. ``warn``: say so when the run-level file differs."""
    run_dir = Path(run_dir)
    run_level = run_dir / RUN_CONFIG
    if ckpt is None or not (ckpt / "run_config.yaml").is_file():
        if not run_level.is_file():
            raise MoelabError(f"--resume {run_dir}: no {RUN_CONFIG} there; not a moelab run directory")
        return TrainConfig.load(run_level), run_level
    verified = ckpt / "run_config.yaml"
    cfg = TrainConfig.load(verified)
    if warn:
        why = None
        if not run_level.is_file():
            why = "is missing"
        else:
            try:  # fields a resume may change (--steps ...) legitimately differ from the run's first config
                diff = non_resumable(config_differences(TrainConfig.load(run_level), cfg))
                why = f"differs from it ({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''})" if diff else None
            except (MoelabError, ValueError, OSError) as e:
                why = f"is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        if why:
            warnings.warn(f"resuming with the verified copy {verified}; {run_level} {why} (change resumable "
                          "fields with flags, e.g. --steps; start a new --out for anything else)", stacklevel=3)
    return cfg, verified


def resumed_tokenizer(run_dir: Path, ckpt: Path | None) -> Path:
    """The tokenizer file a resume loads: the checkpoint's verified copy (warning when the run's
    ``tokenizer.json`` differs), else the run's own."""
    run_level = Path(run_dir) / "tokenizer.json"
    if ckpt is None or not (ckpt / "tokenizer.json").is_file():
        return run_level
    verified = ckpt / "tokenizer.json"
    try:
        same = run_level.read_bytes() == verified.read_bytes()
    except OSError:
        same = False
    if not same:
        warnings.warn(f"{run_level} {'differs from' if run_level.is_file() else 'is missing; using'} the verified "
                      f"copy {verified}; resuming with the checkpoint's tokenizer", stacklevel=3)
    return verified


def _files(source: str) -> list[tuple[str, Path]]:
    if source == "builtin":
        return []
    path = Path(source)
    if path.is_dir():
        return [(p.relative_to(path).as_posix(), p) for p in text_files(path)]
    return [(str(path), path)] if path.is_file() else []


def _file_print(path: Path) -> dict:
    """One file's fingerprint, hashed once per process while its inode, size, modification and change
    time stay the same (experiment variants and repeated checks reuse it; each rank hashes it once).
    A file changed less than :data:`RACY_NS` ago is hashed again next time (racily clean)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _PRINTS:
        return dict(_PRINTS[key])
    out = _hash_file(path, st)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:  # racily clean files are hashed again
        _PRINTS[key] = dict(out)
    return out


def _hash_file(path: Path, st) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_LIMIT:
            while chunk := f.read(_MIB):
                h.update(chunk)
            how = "full"
        else:  # the first and the last MiB: a fast check of a large corpus (size and mtime beside it)
            h.update(f.read(_MIB))
            f.seek(st.st_size - _MIB)
            h.update(f.read(_MIB))
            how = "first and last MiB"
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest(), "hashed": how}


def data_fingerprint(source: str, seed: int = 0) -> dict:
    """``{"source": ..., "files": {name: {size, mtime_ns, sha256, hashed}}}`` of the data a run reads
    (``cfg.data``: a file, a directory of text files, a .jsonl; the built-in corpus of ``seed``: one
    entry, :data:`BUILTIN_KEY`, with its Python and corpus versions)."""
    source = str(source)
    if source == "builtin":
        return {"source": source, "files": {BUILTIN_KEY: _builtin_print(seed)}}
    return {"source": source, "files": {name: _file_print(p) for name, p in _files(source)}}


def _builtin_print(seed: int) -> dict:
    from moelab.data.corpus import builtin_fingerprint, default_cache_dir

    key = ("builtin", seed, str(default_cache_dir()))
    if key not in _PRINTS:
        _PRINTS[key] = builtin_fingerprint(seed)
    return dict(_PRINTS[key])


def _saved_fingerprint(ckpt: Path) -> dict | None:
    try:
        meta = json.loads((ckpt / STATE_JSON).read_text())
    except (OSError, ValueError):
        return None  # the trainer reports an unreadable trainer_state.json
    saved = meta.get(DATA_KEY) if isinstance(meta, dict) else None
    return saved if isinstance(saved, dict) and isinstance(saved.get("files"), dict) else None


def check_data_unchanged(ckpt: Path | None, current: dict, allow: bool = False) -> None:
    """Refuse (CheckpointError naming the file) to resume from ``ckpt`` on data that changed since it
    was saved; with ``allow`` warn instead. Checkpoints from before fingerprints are not checked."""
    saved = _saved_fingerprint(ckpt) if ckpt is not None else None
    if saved is None:
        return
    problems, maybe = [], []
    if saved.get("source") != current["source"]:
        problems.append(f"data {saved.get('source')!r} is now {current['source']!r}")
    old, new = saved["files"], current["files"]
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None and name == BUILTIN_KEY:
            continue  # a checkpoint from before the built-in corpus was fingerprinted
        if a is None:
            problems.append(f"{name}: added")
        elif b is None:
            problems.append(f"{name}: missing")
        elif "python" in b and (a.get("size"), a.get("sha256")) != (b["size"], b["sha256"]):  # the built-in corpus
            problems.append(f"{name}: its documents changed (generated by Python {b['python']}, corpus version "
                            f"{b.get('builtin_version')} now; by Python {a.get('python')}, version "
                            f"{a.get('builtin_version')} when {ckpt.name} was saved)")
        elif a.get("size") != b["size"]:
            problems.append(f"{name}: {b['size']:,} bytes, {a.get('size', 0):,} when {ckpt.name} was saved")
        elif a.get("sha256") != b["sha256"]:
            problems.append(f"{name}: its content changed (SHA-256 differs)")
        elif b["hashed"] != "full" and a.get("mtime_ns") != b["mtime_ns"]:
            maybe.append(name)
    if maybe and not problems:
        warnings.warn(f"{', '.join(maybe[:3])}: modified since {ckpt.name} was saved (same size, same first and last "
                      "MiB: the middle is not compared); resuming", stacklevel=3)
    if not problems:
        return
    what = "; ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
    if allow:
        warnings.warn(f"the training data changed since {ckpt.name}: {what}; resuming on the new data "
                      "(--allow-data-change)", stacklevel=3)
        return
    raise CheckpointError(f"the training data changed since {ckpt} was saved: {what}; resume with the data the run "
                          "was trained on, or pass --allow-data-change to continue on the new data")


def fingerprint_or_none(source: str, seed: int = 0) -> dict | None:
    """:func:`data_fingerprint`, or None when the data cannot be read now (the data loader reports it)."""
    try:
        return data_fingerprint(source, seed)
    except OSError:
        return None
