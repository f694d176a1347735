"""Checkpoint integrity: every moelab model or checkpoint directory carries ``manifest.json`` with
the size and SHA-256 of each of its files, written (after every file is flushed to disk) just
before the directory is renamed into place. Loading verifies it, so a truncated file, a flipped
bit, or a missing file is reported by name (files added afterwards are listed, not loaded) instead of being loaded.

Hashing reads every byte once (about 1 GB/s per core); it is the price of never training on, or
evaluating, a silently corrupted checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moelab.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "moelab-manifest-1"
_CHUNK = 1 << 20


def file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> Path:
    """Flush every file of ``directory`` to disk and record its size and SHA-256 (call last, before
    the directory is published by a rename)."""
    directory = Path(directory)
    files = {}
    for p in _files(directory):
        _fsync(p)
        size, digest = file_digest(p)
        files[p.relative_to(directory).as_posix()] = {"size": size, "sha256": digest}
    path = directory / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")
    _fsync(path)
    return path


@dataclass
class Verification:
    directory: Path
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    # files added after the manifest was written (e.g. a tokenizer copied beside a saved model): never
    # read by moelab's loaders, reported but not a failure
    extra: list[str] = field(default_factory=list)
    has_manifest: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"directory": str(self.directory), "ok": self.ok, "files": self.files, "bytes": self.bytes,
                "manifest": self.has_manifest, "problems": self.problems, "extra_files": self.extra}


def check_directory(directory: Path, require_manifest: bool = True) -> Verification:
    """Every problem of ``directory`` against its manifest (none raised)."""
    directory = Path(directory)
    v = Verification(directory)
    path = directory / MANIFEST
    if not path.is_file():
        v.has_manifest = False
        if require_manifest:
            v.problems.append(f"{MANIFEST} is missing (a checkpoint written before integrity manifests, or a "
                              "directory not written by moelab)")
        return v
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(entries, dict):
            raise ValueError(f"unknown manifest format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        v.problems.append(f"{MANIFEST} is unreadable ({e})")
        return v
    for rel, want in entries.items():
        p = directory / rel
        if not p.is_file():
            v.problems.append(f"{rel}: missing")
            continue
        size, digest = file_digest(p)
        v.files += 1
        v.bytes += size
        if size != want["size"]:
            v.problems.append(f"{rel}: {size:,} bytes, the manifest says {want['size']:,} (truncated or overwritten)")
        elif digest != want["sha256"]:
            v.problems.append(f"{rel}: SHA-256 differs from the manifest (the content changed: a flipped bit or "
                              "an overwrite)")
    known = set(entries)
    for p in _files(directory):
        rel = p.relative_to(directory).as_posix()
        if rel not in known:
            v.extra.append(rel)
    return v


# Directories this process verified, by the size and modification time of every file: loading a
# run's model and then its tokenizer resolves (and verifies) the same checkpoint twice, and hashing
# gigabytes of weights twice buys nothing while no file has changed. `moelab ckpt verify` and the
# torture harness call check_directory, which always hashes.
_verified: dict[Path, tuple] = {}


def _signature(directory: Path) -> tuple:
    return tuple((p.relative_to(directory).as_posix(), st.st_size, st.st_mtime_ns)
                 for p in sorted(directory.rglob("*")) if p.is_file() and (st := p.stat()))


def verify_directory(directory: Path, require_manifest: bool = False) -> Verification:
    """Raise CheckpointError naming the first corrupt file; a directory without a manifest passes
    unless ``require_manifest``. A directory verified before in this process, with no file changed
    in size or modification time since, is not hashed again."""
    key = Path(directory).resolve()
    signature = _signature(key)
    if _verified.get(key) == signature and ((key / MANIFEST).is_file() or not require_manifest):
        return Verification(Path(directory))
    v = check_directory(directory, require_manifest=require_manifest)
    if not v.ok:
        more = f" (and {len(v.problems) - 1} more)" if len(v.problems) > 1 else ""
        raise CheckpointError(f"{directory}: {v.problems[0]}{more}; run `moelab ckpt verify {directory}` for the "
                              "list, resume from an earlier checkpoint or re-save it")
    _verified[key] = signature
    return v
