"""Checkpoint integrity: every moelab model or checkpoint directory carries ``manifest.json`` with
the size and SHA-256 of each of its files, written (after every file is flushed to disk) just
before the directory is renamed into place. Loading verifies it, so a truncated file, a flipped
bit, or a missing file is reported by name (files added afterwards are listed, not loaded) instead of being loaded.

The manifest itself is untrusted input: an entry of the wrong shape (a bit flipped in a key) is a
reported problem, not a crash, and a path that leaves the directory (absolute, ``..``, a symbolic
link pointing outside) is refused without being opened.

Every directory this version of moelab writes has a manifest, so a missing one means loss or
tampering: loading warns and treats the directory as unverified (resume prefers an older, verified
checkpoint). ``allow_unverified=True`` or ``MOELAB_ALLOW_UNVERIFIED=1`` accepts directories written
before manifests existed without the warning.

Hashing reads every byte once (about 1 GB/s per core, ``moelab bench ckpt``); it is the price of
never training on, or evaluating, a silently corrupted checkpoint. A multi-process checkpoint is
hashed by all its ranks at once, each its own share (``part``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from moelab.checkpoint.layout import CONFIG, DCP_DIR, REQUIRED, REQUIRED_DCP, STATE_JSON, WEIGHTS
from moelab.errors import CheckpointError
from moelab.fileio import fsync_dir, fsync_path

MANIFEST = "manifest.json"
FORMAT = "moelab-manifest-1"
ALLOW_ENV = "MOELAB_ALLOW_UNVERIFIED"
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def allow_unverified_default() -> bool:
    """``MOELAB_ALLOW_UNVERIFIED=1``: directories without a manifest (from before manifests) load without
    the warning and are not passed over for older, verified checkpoints."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def unsafe_path(directory: Path, rel: str) -> str | None:
    """Why ``rel`` (a path read from a manifest or DCP metadata) may not be opened inside ``directory``,
    or None: absolute paths, ``..`` and symbolic links that resolve outside are refused."""
    if not isinstance(rel, str) or not rel:
        return f"{rel!r} is not a relative file name"
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or re.match(r"^[A-Za-z]:", rel):
        return "an absolute path"
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        return "it contains '..'"
    if "\x00" in rel:
        return "it contains a NUL byte"
    root = Path(directory).resolve()
    try:
        inside = (Path(directory) / rel).resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop
        return "it cannot be resolved (a symbolic link loop)"
    return None if inside else "a symbolic link leading outside the directory"


def confined(directory: Path, rel: str, source: str = MANIFEST) -> Path:
    """``directory / rel``, or a CheckpointError when ``rel`` leaves ``directory`` (see unsafe_path)."""
    why = unsafe_path(directory, rel)
    if why:
        raise CheckpointError(f"{directory}: {source} names {rel!r}, which is outside the directory ({why}); "
                              "refused (the file was damaged or forged)")
    return Path(directory) / rel


def entry_problem(rel, want) -> str | None:
    """Why one manifest entry is malformed (a size that is not a non-negative int, a SHA-256 that is not
    64 hex digits), or None."""
    if not isinstance(want, dict):
        return f"its value is {type(want).__name__}, not an object"
    size, digest = want.get("size"), want.get("sha256")
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        return f"'size' is {size!r}, not a byte count" if "size" in want else \
            f"no 'size' (keys: {', '.join(sorted(map(str, want)))})"
    if not (isinstance(digest, str) and _SHA256.match(digest)):
        return f"'sha256' is {digest!r}, not 64 hex digits" if "sha256" in want else \
            f"no 'sha256' (keys: {', '.join(sorted(map(str, want)))})"
    return None


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, known: dict[str, dict] | None = None) -> Path:
    """Flush every file of ``directory`` to disk and record its size and SHA-256 (call last, before
    the directory is published by a rename); then flush the directory and its subdirectories.
    ``known``: entries already fsynced and hashed by the processes that wrote them (each rank its own
    shards), checked here by existence and size only (not hashed again)."""
    directory = Path(directory)
    files: dict[str, dict] = {}
    for rel, want in sorted((known or {}).items()):
        problem = entry_problem(rel, want) or unsafe_path(directory, rel)
        if problem:
            raise CheckpointError(f"{directory}: the entry for {rel!r} is invalid ({problem})")
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"{directory / rel}: hashed by the process that wrote it, but missing here "
                                  "(a node-local disk, or a directory listing not yet visible)")
        if p.stat().st_size != want["size"]:
            raise CheckpointError(f"{directory / rel}: {p.stat().st_size:,} bytes here, {want['size']:,} bytes when "
                                  "its writer hashed it")
        files[rel] = {"size": want["size"], "sha256": want["sha256"]}
    for p in _files(directory):
        rel = p.relative_to(directory).as_posix()
        if rel in files:
            continue
        if unsafe_path(directory, rel):
            raise CheckpointError(f"{p}: a symbolic link leading outside {directory}; a checkpoint holds files only")
        fsync_path(p)
        size, digest = file_digest(p)
        files[rel] = {"size": size, "sha256": digest}
    path = directory / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, "files": dict(sorted(files.items()))}, indent=1) + "\n")
    fsync_path(path)
    for d in sorted((p for p in directory.rglob("*") if p.is_dir() and not p.is_symlink()),
                    key=lambda p: -len(p.parts)):
        fsync_dir(d)
    fsync_dir(directory)
    return path


def read_manifest(directory: Path) -> dict:
    """The ``files`` of ``directory``'s manifest (entries not validated: see entry_problem); a
    CheckpointError when it is missing or not a moelab manifest."""
    return _read_manifest(directory)[0]


def is_moelab_manifest(directory: Path) -> bool:
    """Whether ``directory`` holds a manifest.json that moelab wrote (its ``format`` says so; damaged
    entries or not): another tool's manifest.json in a Hugging Face directory is none of moelab's."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("moelab-manifest")


def _read_manifest(directory: Path) -> tuple[dict, str]:
    """(the manifest's ``files``, the SHA-256 of the bytes they were parsed from)."""
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw.decode())
        if not isinstance(manifest, dict):
            raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {manifest.get('format')!r}")
        entries = manifest.get("files")
        if not isinstance(entries, dict):
            raise ValueError(f"'files' is {type(entries).__name__}, not an object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{MANIFEST} is unreadable ({e})") from e
    return entries, hashlib.sha256(raw).hexdigest()


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
    # the SHA-256 of the manifest this process read (processes that share the hashing must agree on it)
    manifest_sha256: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"directory": str(self.directory), "ok": self.ok, "files": self.files, "bytes": self.bytes,
                "manifest": self.has_manifest, "problems": self.problems, "extra_files": self.extra}


def share(entries: dict, part: tuple[int, int] | None) -> set[str]:
    """The manifest entries that process ``rank`` of ``world`` hashes (``part=(rank, world)``): the
    largest first, each to the least-loaded process, so every process hashes about 1/world of the
    bytes. Every process computes the same split from the same manifest."""
    if part is None or part[1] <= 1:
        return set(entries)
    rank, world = part

    def size(rel: str) -> int:
        want = entries[rel]
        return want["size"] if entry_problem(rel, want) is None else 0

    load, mine = [0] * world, set()
    for rel in sorted(entries, key=lambda rel: (-size(rel), rel)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += size(rel)
        if r == rank:
            mine.add(rel)
    return mine


def check_directory(directory: Path, require_manifest: bool = True, part: tuple[int, int] | None = None
                    ) -> Verification:
    """Every problem of ``directory`` against its manifest (none raised); ``part=(rank, world)``:
    hash only this process's share of the files (the others hash theirs)."""
    directory = Path(directory)
    v = Verification(directory)
    if not (directory / MANIFEST).is_file():
        v.has_manifest = False
        if require_manifest:
            v.problems.append(f"{MANIFEST} is missing (a checkpoint written before integrity manifests, or a "
                              "directory not written by moelab)")
        return v
    try:
        entries, v.manifest_sha256 = _read_manifest(directory)
    except CheckpointError as e:
        v.problems.append(str(e))
        return v
    mine = share(entries, part)
    for rel, want in entries.items():
        why = unsafe_path(directory, rel)
        if why:
            v.problems.append(f"{MANIFEST}: entry {rel!r} is outside the directory ({why}); refused, not read")
            continue
        malformed = entry_problem(rel, want)
        if malformed:
            v.problems.append(f"{MANIFEST}: entry {rel!r} is malformed ({malformed}); the manifest is damaged, so "
                              f"{rel} cannot be verified")
            continue
        if rel not in mine:
            continue
        p = directory / rel
        if not p.is_file():
            v.problems.append(f"{rel}: missing")
            continue
        try:
            size, digest = file_digest(p)
        except OSError as e:
            v.problems.append(f"{rel}: unreadable ({e})")
            continue
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


def required_files(directory: Path) -> set[str]:
    """The files the layout of ``directory`` always has (moelab.checkpoint.layout): a checkpoint's
    (it has ``trainer_state.json``), else a model directory's config and weights."""
    directory = Path(directory)
    if (directory / STATE_JSON).is_file():
        return set(REQUIRED) | set(REQUIRED_DCP)
    return {CONFIG, WEIGHTS, f"{DCP_DIR}/.metadata"}


def verify_file(directory: Path, rel: str, allow_unverified: bool | None = None) -> None:
    """Check one file of ``directory`` (a tokenizer beside a model) against the manifest, when there is
    one. A file the manifest does not list is an error when the layout requires it (a checkpoint's
    tokenizer, a model's config or weights) or the manifest names a file that is not there (a damaged
    key: the entry may be this file's); otherwise it is loaded with a warning (added after the manifest)."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        _warn_unverified(directory, allow_unverified)
        return
    entries = read_manifest(directory)  # a CheckpointError when unreadable
    confined(directory, rel)
    if rel not in entries:
        dangling = sorted(k for k in entries if not unsafe_path(directory, k) and not (directory / k).is_file())
        if rel in required_files(directory) or dangling:
            why = (f"it names {dangling[0]!r}, which is not there: a damaged key?" if dangling else
                   "every such directory lists it: the manifest was damaged or edited")
            raise CheckpointError(f"{directory / rel}: not in {directory / MANIFEST} ({why}); the file cannot be "
                                  f"verified; run `moelab ckpt verify {directory}`")
        warnings.warn(f"{directory / rel}: not in {directory / MANIFEST} (added after it was written); "
                      "loading it unverified", stacklevel=3)
        return
    problem = entry_problem(rel, entries[rel])
    if problem:
        raise CheckpointError(f"{directory}: {MANIFEST}: entry {rel!r} is malformed ({problem}); run "
                              f"`moelab ckpt verify {directory}`")
    size, digest = file_digest(directory / rel)
    if (size, digest) != (entries[rel]["size"], entries[rel]["sha256"]):
        what = "SHA-256" if size == entries[rel]["size"] else f"size ({size:,} bytes)"
        raise CheckpointError(f"{directory / rel}: {what} differs from the manifest; run `moelab ckpt verify "
                              f"{directory}`")


# Directories this process verified, by the identity (inode), size, modification and change time of
# every file: loading a run's model and then its tokenizer resolves (and verifies) the same checkpoint
# twice, and hashing gigabytes of weights twice buys nothing while no file has changed. A rewrite that
# keeps the size and restores the modification time still changes the change time (ctime cannot be
# set back). `moelab ckpt verify` and the torture harness call check_directory, which always hashes.
# A file changed within one timestamp tick of the verification (on a filesystem with coarse
# timestamps, a same-size rewrite in the same second keeps mtime and ctime) would look unchanged, so a
# directory is remembered only when every file is older than RACY_NS when verification starts (git's
# "racily clean" rule): a directory written seconds ago is hashed again at every load.
_verified: dict[Path, tuple] = {}
RACY_NS = 2 * 10**9
_clock = time.time_ns  # the clock of that rule (tests move it on)


def _settled(signature: tuple, start_ns: int) -> bool:
    """Whether every file of ``signature`` was last modified (mtime and ctime) RACY_NS before ``start_ns``."""
    return all(max(mtime, ctime) < start_ns - RACY_NS for *_, mtime, ctime in signature)


def _signature(directory: Path) -> tuple:
    return tuple((p.relative_to(directory).as_posix(), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                 for p in sorted(directory.rglob("*")) if p.is_file() and (st := p.stat()))


def _warn_unverified(directory: Path, allow_unverified: bool | None) -> None:
    if allow_unverified if allow_unverified is not None else allow_unverified_default():
        return
    warnings.warn(f"{directory}: {MANIFEST} is missing; every directory moelab writes has one, so it was lost or "
                  "removed: loading it UNVERIFIED (a flipped bit or a swapped file would go unnoticed). For a "
                  f"directory from before manifests set {ALLOW_ENV}=1; `moelab ckpt verify` lists what it can",
                  stacklevel=4)


def verify_directory(directory: Path, require_manifest: bool = False, allow_unverified: bool | None = None,
                     part: tuple[int, int] | None = None) -> Verification:
    """Raise CheckpointError naming the first corrupt file. A directory without a manifest is an error
    with ``require_manifest``, else it passes unverified (``has_manifest`` False) with a warning unless
    ``allow_unverified`` (default: ``MOELAB_ALLOW_UNVERIFIED``). A directory verified before in this
    process, with no file changed since (inode, size, mtime, ctime) and every file older than RACY_NS
    when it was verified, is not hashed again.
    ``part=(rank, world)``: hash only this process's share (never remembered)."""
    key = Path(directory).resolve()
    has_manifest = (key / MANIFEST).is_file()
    if not has_manifest and not require_manifest:
        _warn_unverified(Path(directory), allow_unverified)
        return Verification(Path(directory), has_manifest=False)
    start = _clock()
    signature = _signature(key) if part is None else None
    if signature is not None and _verified.get(key) == signature:
        return Verification(Path(directory))
    v = check_directory(directory, require_manifest=require_manifest, part=part)
    if not v.ok:
        more = f" (and {len(v.problems) - 1} more)" if len(v.problems) > 1 else ""
        raise CheckpointError(f"{directory}: {v.problems[0]}{more}; run `moelab ckpt verify {directory}` for the "
                              "list, resume from an earlier checkpoint or re-save it")
    if signature is not None and _settled(signature, start):
        _verified[key] = signature
    return v
