"""Directories moelab writes: atomically, durably, and never over a user's files.

``atomic_directory``: everything is written into a temporary directory beside the target, which is
renamed into place only when complete, so a reader sees the old directory or the new one, never half
of one. Before the rename every file and directory in it gets its mode and is fsynced (with
``manifest=True`` their sizes and SHA-256 are recorded first, :mod:`moelab.checkpoint.integrity`);
after it the parent is fsynced, so once the call returns a power loss keeps the new directory (a
caller may then prune). A failure at any point removes the temporary directory and leaves the target
as it was.

Ownership: a directory moelab writes holds ``.moelab`` (JSON: the kind of output, the moelab version
and, for an atomic directory, the size and modification time of every file written). A target that
already exists is replaced only when it is an output of the same kind and every file in it is one
moelab recorded writing, unchanged since (its ``.moelab``, or the sizes in its manifest), or
``force`` is given; a plain file or a symbolic link is never replaced. New directories and files
get the user's umask (the temporary directory is made 0700 by ``mkdtemp``; it is opened up before
the rename).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from moelab.checkpoint.integrity import MANIFEST, write_manifest
from moelab.checkpoint.layout import STATE_JSON, STATE_PT
from moelab.errors import MoelabError
from moelab.faults import kill_point
from moelab.fileio import dir_mode, file_mode, fsync_dir, fsync_path, make_dirs, write_atomic

MARKER = ".moelab"
MARKER_FORMAT = "moelab-output-1"
FORCE_FIX = "choose another output directory, or pass --force (force=True) to replace it"

__all__ = ["MARKER", "atomic_directory", "check_replaceable", "foreign_files", "forced_outputs", "fsync_dir",
           "mark_output_dir", "output_kind", "prepare_output_dir", "read_marker", "write_marker"]

# output directories the command line was told to write into with --force (forced_outputs)
_FORCED: ContextVar[frozenset] = ContextVar("moelab_forced_outputs", default=frozenset())


def _version() -> str:
    from moelab import __version__

    return __version__


def read_marker(directory: Path) -> dict | None:
    """The ``.moelab`` record of ``directory``, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def _read_manifest_files(directory: Path) -> dict | None:
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
        if str(manifest.get("format", "")).startswith("moelab-manifest") and isinstance(manifest.get("files"), dict):
            return manifest["files"]
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _recorded_files(directory: Path) -> dict[str, dict | None]:
    """Files (relative path -> what was recorded of them) moelab wrote into ``directory``: its
    marker's entries (size and modification time) and its manifest's (size; a directory written
    before markers existed is known by its manifest). None: the marker or manifest itself."""
    known: dict[str, dict | None] = {}
    manifest = _read_manifest_files(directory)
    if manifest is not None:
        known[MANIFEST] = None
        known.update({str(k): {"size": v["size"]} for k, v in manifest.items()
                      if isinstance(v, dict) and isinstance(v.get("size"), int)})
    marker = read_marker(directory)
    if marker is not None:
        known[MARKER] = None
        if isinstance(marker.get("files"), dict):
            for k, v in marker["files"].items():
                if isinstance(v, dict) and isinstance(v.get("size"), int):
                    known[str(k)] = {**(known.get(str(k)) or {}), **v}
    return known


def _unchanged(path: Path, recorded: dict | None) -> bool:
    """Whether ``path`` is still the file moelab recorded (a plain file of that size and mtime)."""
    if recorded is None:
        return True
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    return st.st_size == recorded.get("size", st.st_size) and st.st_mtime_ns == recorded.get("mtime_ns",
                                                                                             st.st_mtime_ns)


def foreign_files(directory: Path) -> list[str]:
    """What in ``directory`` moelab did not write, or changed since it wrote it (relative paths,
    sorted; a directory that cannot be listed and a symbolic link are reported too): replacing the
    directory would delete these."""
    directory = Path(directory)
    known = _recorded_files(directory)
    out = []

    def unreadable(e: OSError) -> None:
        rel = Path(e.filename).relative_to(directory).as_posix() if e.filename else "."
        out.append(f"{rel}/ (unreadable)")

    for root, dirs, files in os.walk(directory, onerror=unreadable):
        rel_root = Path(root).relative_to(directory)
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]  # not walked into
        for name in files + links:
            rel = (rel_root / name).as_posix()
            if rel not in known or os.path.islink(os.path.join(root, name)) or not _unchanged(Path(root) / name,
                                                                                                known[rel]):
                out.append(rel)
        if not dirs and not files and Path(root) != directory:
            rel = rel_root.as_posix()
            if not any(k.startswith(rel + "/") for k in known):
                out.append(rel + "/")
    return sorted(out)


def output_kind(directory: Path) -> str | None:
    """What moelab wrote ``directory`` as (its marker's ``kind``; a directory from before markers
    with a manifest: ``checkpoint`` or ``moelab-model``), or None."""
    marker = read_marker(directory)
    if marker is not None:
        return str(marker.get("kind"))
    files = _read_manifest_files(directory)
    if files is None:
        return None
    return "checkpoint" if STATE_JSON in files or STATE_PT in files else "moelab-model"


def check_replaceable(target: Path, force: bool = False, fix: str = FORCE_FIX, kind: str | None = None) -> None:
    """Raise a MoelabError naming ``target`` unless writing a directory there deletes nothing a user
    wrote: it does not exist, is an empty directory, or is an output of ``kind`` (any kind when None)
    holding only files moelab wrote, unchanged (``force``: any directory). A plain file and a symbolic
    link are never replaced."""
    target = Path(target)
    if target.is_symlink():
        raise MoelabError(f"{target} is a symbolic link (to {os.readlink(target)}); moelab never replaces a link: "
                          "give the directory's real path, or choose another output directory")
    if not target.exists():
        return
    if not target.is_dir():
        raise MoelabError(f"{target} is a file, not a directory; moelab never replaces a file with a directory: "
                          "choose another output directory")
    if force:
        return
    foreign = foreign_files(target)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MoelabError(f"{target} is not empty and holds files moelab did not write ({shown}); {fix}")
    have = output_kind(target)
    if kind is not None and have is not None and have != kind and any(target.iterdir()):
        raise MoelabError(f"{target} holds a moelab {have}, not a {kind}; replacing it would delete it: {fix}")


@contextmanager
def forced_outputs(*paths):
    """Within the block, :func:`prepare_output_dir` treats ``paths`` as given ``force=True`` (the
    command line's ``--force``, checked before the command runs, reaching the library's writers)."""
    token = _FORCED.set(_FORCED.get() | {os.path.abspath(p) for p in paths if p})
    try:
        yield
    finally:
        _FORCED.reset(token)


def mark_output_dir(directory: str | os.PathLike, kind: str) -> Path:
    """``mkdir -p`` (durably: :func:`moelab.fileio.make_dirs`) and write ``.moelab`` (no file list:
    moelab writes files into it) unless it has one."""
    directory = make_dirs(directory)
    if read_marker(directory) is None:
        write_atomic(directory / MARKER, json.dumps({"format": MARKER_FORMAT, "kind": kind,
                                                     "moelab_version": _version(), "files": None}) + "\n")
    return directory


def write_marker(directory: Path, kind: str) -> Path:
    """Write ``.moelab`` into a directory moelab wrote whole (before it is published): ``kind`` and the
    size and modification time of every file in it, so a later replacement can tell them from files
    someone added or changed."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != MARKER:
            st = p.stat()
            files[p.relative_to(directory).as_posix()] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    path = directory / MARKER
    path.write_text(json.dumps({"format": MARKER_FORMAT, "kind": kind, "moelab_version": _version(),
                                "files": files}) + "\n")
    return path


def prepare_output_dir(out: str | os.PathLike, force: bool = False, kind: str = "output",
                       fix: str = "choose another --out, or pass --force to write into it") -> Path:
    """Create (or reuse) ``out`` for a command that writes files into it (a report, an analysis):
    refuse a plain file, and a non-empty directory moelab did not write unless ``force`` (or
    :func:`forced_outputs`); then mark it as moelab's (``.moelab``), so a re-run with the same ``out``
    works. A directory that already held someone else's files is written into but never marked (it
    stays theirs: the next command needs ``force`` again). Nothing is deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoelabError(f"{out} is a file, not a directory; choose another --out")
    theirs = out.is_dir() and read_marker(out) is None and any(out.iterdir())
    if theirs and not (force or os.path.abspath(out) in _FORCED.get()):
        first = sorted(p.name for p in out.iterdir())[:3]
        raise MoelabError(f"{out} is not empty and was not written by moelab ({', '.join(first)}); {fix}")
    if theirs:
        return out
    return mark_output_dir(out, kind)


def atomic_directory(target: Path, manifest: bool = False, kind: str = "directory", force: bool = False):
    """Context manager yielding a temp dir beside ``target`` that replaces it on success.
    ``manifest``: record every file's size and SHA-256 (moelab.checkpoint.integrity); ``kind``: what
    ``.moelab`` calls it (an existing ``target`` of another kind is not replaced); ``force``: replace
    ``target`` even when it holds files moelab did not write or is of another kind (checked on
    entry, before any work, and again before the rename)."""
    return _AtomicDir(Path(target), manifest, kind, force)


class _AtomicDir:
    def __init__(self, target: Path, manifest: bool = False, kind: str = "directory", force: bool = False):
        self.target, self.manifest, self.kind, self.force = target, manifest, kind, force

    def __enter__(self) -> Path:
        check_replaceable(self.target, self.force, kind=self.kind)
        make_dirs(self.target.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        try:
            self._seal()
            if self.manifest:
                kill_point("ckpt-manifest")
            if os.path.lexists(self.target):
                check_replaceable(self.target, self.force, kind=self.kind)  # it may have changed while we wrote
                old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
                os.replace(self.target, old)
            kill_point("ckpt-rename")
            os.replace(self.tmp, self.target)
            fsync_dir(self.target.parent)  # the new one is durable before the old one is deleted
        except BaseException:
            if old is not None and old.exists() and not os.path.lexists(self.target):
                os.replace(old, self.target)  # put the old one back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _seal(self) -> None:
        """Modes, marker, manifest, and every file and directory fsynced: the temp directory is
        complete on disk before it is renamed into place."""
        # mkdtemp makes 0700 and safetensors 0600: give everything the user's umask, as open() would,
        # before the fsyncs (so the modes are durable too)
        fmode, dmode = file_mode(), dir_mode()
        for p in self.tmp.rglob("*"):
            if p.is_file() and not p.is_symlink():
                os.chmod(p, fmode)
            elif p.is_dir() and not p.is_symlink():
                os.chmod(p, dmode)
        os.chmod(self.tmp, dmode)
        write_marker(self.tmp, self.kind)
        if self.manifest:
            write_manifest(self.tmp)  # fsyncs every file it lists (the marker too), itself and every directory
            return
        for p in self.tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        for d in sorted((p for p in self.tmp.rglob("*") if p.is_dir() and not p.is_symlink()),
                        key=lambda p: -len(p.parts)):
            fsync_dir(d)
        fsync_dir(self.tmp)
