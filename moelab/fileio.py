"""Durable, atomic file writes: a reader sees the old file or the new one, never half of one, and a
power loss after the call returns keeps the new one (the data is fsynced before the rename, the
directory entry after it). New files and directories get the user's umask, like any file they write."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

# fsync on a directory is refused by some filesystems (and by some for read-only descriptors): that is
# "not supported", not a lost write. Anything else (EIO above all) means the data may not be on disk.
FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data (or a directory's entries) to disk; errors other than "not supported"
    for a directory are raised (an EIO here means the write may be lost)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (os.path.isdir(path) and e.errno in FSYNC_UNSUPPORTED):
            raise
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (a rename into it, a new file) durable. Only the
    "not supported" errnos (:data:`FSYNC_UNSUPPORTED`) are ignored; EIO and the rest are raised."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p path``, with each directory it creates made durable in its parent."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):
        fsync_dir(d.parent)
    return path


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, fsync it, rename it over ``path``
    and fsync the directory: after a power loss ``path`` holds the old text or the new, never an
    empty or partial file. A replaced file keeps its mode; a new one gets the user's umask."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)  # what the user (or we) chose for the file it replaces
    except OSError:
        mode = file_mode()  # mkstemp makes 0600; give a new file the usual permissions
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)  # before the fsync, so the mode is durable with the data
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
