"""Atomic directories: everything is written into a temporary directory beside the target, which is
renamed into place only when complete, so a reader sees the old directory or the new one, never half
of one. With ``manifest=True`` every file is flushed and its size and SHA-256 recorded first
(:mod:`moelab.checkpoint.integrity`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from moelab.checkpoint.integrity import write_manifest
from moelab.faults import kill_point


def atomic_directory(target: Path, manifest: bool = False):
    """Context manager yielding a temp dir beside ``target`` that replaces it on success;
    ``manifest``: first flush every file and record its size and SHA-256 (moelab.checkpoint.integrity)."""
    return _AtomicDir(Path(target), manifest)


class _AtomicDir:
    def __init__(self, target: Path, manifest: bool = False):
        self.target, self.manifest = target, manifest

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.manifest:
            try:
                write_manifest(self.tmp)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            kill_point("ckpt-manifest")
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
            kill_point("ckpt-rename")
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            kill_point("ckpt-rename")
            os.replace(self.tmp, self.target)
        fsync_dir(self.target.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX: the directory entry is flushed with the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)
