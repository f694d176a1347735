"""Directories moelab writes: atomically, durably, and never over a user's files.

``atomic_directory``: everything is written into a temporary directory beside the target, which is
renamed into place only when complete, so a reader sees the old directory or the new one, never half
of one. Before the rename every file and directory in it is fsynced (with ``manifest=True`` their
sizes and SHA-256 are recorded first, :mod:`moelab.checkpoint.integrity`); after it the parent is
fsynced, so once the call returns a power loss keeps the new directory (a caller may then prune).

Ownership: every directory moelab writes holds ``.moelab`` (JSON: the kind of output, the moelab
version and, for an atomic directory, every file written). A target that already exists is replaced
only when everything in it was written by moelab (listed by its ``.moelab`` or its manifest) or
``force`` is given; a plain file is never replaced by a directory. New directories and files get the
user's umask (the temporary directory is made 0700 by ``mkdtemp``; it is opened up before the rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from moelab.checkpoint.integrity import MANIFEST, write_manifest
from moelab.errors import MoelabError
from moelab.faults import kill_point
from moelab.fileio import dir_mode, file_mode, fsync_dir, fsync_path, make_dirs, write_atomic

MARKER = ".moelab"
MARKER_FORMAT = "moelab-output-1"
FORCE_FIX = "choose another output directory, or pass --force (force=True) to replace it"

__all__ = ["MARKER", "atomic_directory", "foreign_files", "fsync_dir", "prepare_output_dir", "read_marker",
           "check_replaceable"]


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


def _recorded_files(directory: Path) -> set[str]:
    """Files (relative paths) moelab recorded writing into ``directory``: its marker's list and its
    manifest's entries (a directory written before markers existed is known by its manifest)."""
    known: set[str] = set()
    marker = read_marker(directory)
    if marker is not None:
        known.add(MARKER)
        if isinstance(marker.get("files"), list):
            known.update(str(f) for f in marker["files"])
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if str(manifest.get("format", "")).startswith("moelab-manifest") and isinstance(manifest.get("files"), dict):
            known.add(MANIFEST)
            known.update(manifest["files"])
    except (OSError, ValueError, AttributeError):
        pass
    return known


def foreign_files(directory: Path) -> list[str]:
    """What in ``directory`` moelab did not write (relative paths, sorted): replacing the directory
    would delete these."""
    directory = Path(directory)
    known = _recorded_files(directory)
    out = []
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        for name in files:
            rel = (rel_root / name).as_posix()
            if rel not in known:
                out.append(rel)
        if not dirs and not files and Path(root) != directory:
            rel = rel_root.as_posix()
            if not any(k.startswith(rel + "/") for k in known):
                out.append(rel + "/")
    return sorted(out)


def check_replaceable(target: Path, force: bool = False, fix: str = FORCE_FIX) -> None:
    """Raise a MoelabError naming ``target`` unless writing a directory there deletes nothing a user
    wrote: it does not exist, is an empty directory, or holds only files moelab wrote (``force``:
    any directory). A plain file is never replaced."""
    target = Path(target)
    if target.is_symlink() and not target.exists():
        raise MoelabError(f"{target} is a dangling symbolic link; remove it or choose another output directory")
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


def prepare_output_dir(out: str | os.PathLike, force: bool = False, kind: str = "output",
                       fix: str = "choose another --out, or pass --force to write into it") -> Path:
    """Create (or reuse) ``out`` for a command that writes files into it (a report, an analysis):
    refuse a plain file, and a non-empty directory moelab did not write unless ``force``; then mark
    it as moelab's (``.moelab``), so a re-run with the same ``out`` works. Nothing is deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoelabError(f"{out} is a file, not a directory; choose another --out")
    if out.is_dir() and read_marker(out) is None and not force and any(out.iterdir()):
        first = sorted(p.name for p in out.iterdir())[:3]
        raise MoelabError(f"{out} is not empty and was not written by moelab ({', '.join(first)}); {fix}")
    make_dirs(out)
    if read_marker(out) is None:
        write_atomic(out / MARKER, json.dumps({"format": MARKER_FORMAT, "kind": kind, "moelab_version": _version(),
                                               "files": None}) + "\n")
    return out


def atomic_directory(target: Path, manifest: bool = False, kind: str = "directory", force: bool = False):
    """Context manager yielding a temp dir beside ``target`` that replaces it on success.
    ``manifest``: record every file's size and SHA-256 (moelab.checkpoint.integrity); ``kind``: what
    ``.moelab`` calls it; ``force``: replace ``target`` even when it holds files moelab did not
    write (checked on entry, before any work)."""
    return _AtomicDir(Path(target), manifest, kind, force)


class _AtomicDir:
    def __init__(self, target: Path, manifest: bool = False, kind: str = "directory", force: bool = False):
        self.target, self.manifest, self.kind, self.force = target, manifest, kind, force

    def __enter__(self) -> Path:
        check_replaceable(self.target, self.force)
        make_dirs(self.target.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._seal()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if self.manifest:
            kill_point("ckpt-manifest")
        if self.target.exists():
            check_replaceable(self.target, self.force)  # it may have changed while we wrote
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
            kill_point("ckpt-rename")
            os.replace(self.tmp, self.target)
            fsync_dir(self.target.parent)  # the new one is durable before the old one is deleted
            shutil.rmtree(old, ignore_errors=True)
        else:
            kill_point("ckpt-rename")
            os.replace(self.tmp, self.target)
            fsync_dir(self.target.parent)

    def _seal(self) -> None:
        """Marker, manifest, modes, and every file and directory fsynced: the temp directory is
        complete on disk before it is renamed into place."""
        files = sorted(p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if p.is_file())
        (self.tmp / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "kind": self.kind,
                                                   "moelab_version": _version(), "files": files}) + "\n")
        if self.manifest:
            write_manifest(self.tmp)  # fsyncs every file it lists (the marker too) and itself
        else:
            for p in self.tmp.rglob("*"):
                if p.is_file():
                    fsync_path(p)
        # mkdtemp makes 0700 and safetensors 0600: give everything the user's umask, as open() would
        fmode, dmode = file_mode(), dir_mode()
        for p in self.tmp.rglob("*"):
            if p.is_file() and not p.is_symlink():
                os.chmod(p, fmode)
        os.chmod(self.tmp, dmode)
        for d in sorted((p for p in self.tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            os.chmod(d, dmode)
            fsync_dir(d)
        fsync_dir(self.tmp)
