"""Simulated power loss for `moelab ckpt torture --power-loss`: what a crash of the machine (not just
of the process) can take away.

A SIGKILL loses nothing the process handed to the kernel; a power loss also loses everything the
kernel had not yet written to disk. This module models the pessimistic POSIX rules and nothing more:

- a file's content survives only as of its last ``fsync`` (a file never fsynced since the attempt
  began keeps the content it had then, and one created since is empty, as XFS leaves it);
- a directory's entries (a new file, a rename, a deletion) survive only as of the directory's last
  ``fsync``; before that the directory keeps the entries it had when the attempt began.

Mechanism (no root, no dm-flakey or LazyFS needed): the training process runs under an in-process
shim (``python -m moelab.reliability.powerloss JOURNAL ROOT -- train ...``) that wraps ``os.fsync``,
``os.replace``, ``os.rename``, ``os.unlink``, ``os.remove`` and ``os.rmdir``. After each real
``fsync`` under ROOT it journals what became durable: a file's inode and a copy of its bytes, or a
directory's entries (name -> inode). Deletions and overwriting renames journal the inode that died,
so a reused inode number is a new file; each checkpoint save that returned journals its step (what
the run then relies on: it must survive). ROOT is the directory that holds the run (the run
directory itself is created under the shim, so losing it is modelled too). Before each attempt the
harness records ROOT's tree (every directory's entries and a copy of every file). After the attempt
is killed the harness rebuilds ROOT as the disk would hold it after a power loss at that instant
(:func:`apply_power_loss`), and the next attempt resumes from that.

Limits: only fsyncs made through Python's ``os.fsync`` count (torch and safetensors never fsync, so
nothing is credited that did not happen); a lost write is modelled as all-or-nothing per file (no
torn blocks or garbage within a file: the manifest's hashes are what would catch those); file
timestamps are not kept; symbolic links and writes by other processes are not modelled; and a real
filesystem (ext4 data=ordered) usually keeps more than this model does, never less.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

JOURNAL = "journal.jsonl"


# ---- the child side: the shim ---------------------------------------------------------------------
class _Shim:
    def __init__(self, journal_dir: Path, root: Path):
        self.dir, self.root = Path(journal_dir), str(Path(root).resolve())
        (self.dir / "blobs").mkdir(parents=True, exist_ok=True)
        self.log = open(self.dir / JOURNAL, "a", buffering=1)  # noqa: SIM115 - open for the process's life
        self.real = {name: getattr(os, name) for name in ("fsync", "replace", "rename", "unlink", "remove", "rmdir")}

    def _under_root(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def _write(self, rec: dict) -> None:
        self.log.write(json.dumps(rec) + "\n")  # line-buffered: in the kernel's hands when the call returns

    def fsync(self, fd):
        self.real["fsync"](fd)
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        if not self._under_root(where):
            return
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            entries = {}
            for name in os.listdir(fd):
                try:
                    s = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(s.st_mode) or stat.S_ISREG(s.st_mode):
                    entries[name] = [s.st_ino, stat.S_ISDIR(s.st_mode)]
            self._write({"op": "dir", "ino": st.st_ino, "entries": entries})
        elif stat.S_ISREG(st.st_mode):
            with open(f"/proc/self/fd/{fd}", "rb") as f:  # works for a write-only descriptor too
                data = f.read()
            digest = hashlib.sha256(data).hexdigest()
            blob = self.dir / "blobs" / digest
            if not blob.exists():
                blob.write_bytes(data)
            self._write({"op": "file", "ino": st.st_ino, "blob": digest})

    def _ino(self, path, dir_fd=None):
        try:
            return os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_ino
        except (OSError, TypeError, ValueError):
            return None

    def _dying(self, name):
        real = self.real[name]

        def wrapper(path, *args, dir_fd=None, **kw):
            ino = self._ino(path, dir_fd)
            real(path, *args, dir_fd=dir_fd, **kw)
            if ino is not None:
                self._write({"op": "dead", "ino": ino})
        return wrapper

    def _moving(self, name):
        real = self.real[name]

        def wrapper(src, dst, *args, src_dir_fd=None, dst_dir_fd=None, **kw):
            old, new = self._ino(dst, dst_dir_fd), self._ino(src, src_dir_fd)
            real(src, dst, *args, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, **kw)
            if old is not None and old != new:
                self._write({"op": "dead", "ino": old})  # the overwritten file
        return wrapper

    def install(self) -> None:
        os.fsync = self.fsync
        for name in ("unlink", "remove", "rmdir"):
            setattr(os, name, self._dying(name))
        for name in ("replace", "rename"):
            setattr(os, name, self._moving(name))


def install(journal_dir: Path, root: Path) -> None:
    """Journal what becomes durable under ``root`` from now on (this process only), and the step of
    every checkpoint save that returns (``{"op": "saved"}``: training goes on relying on it)."""
    shim = _Shim(journal_dir, root)
    shim.install()
    from moelab.train.trainer import Trainer

    save = Trainer._save

    def journaled_save(self) -> None:
        save(self)
        if self.is_main:
            shim._write({"op": "saved", "step": self.step})

    Trainer._save = journaled_save


def saved_steps(journal_dir: Path) -> list[int]:
    """The steps whose checkpoint save returned in the journaled process, in order."""
    path = Path(journal_dir) / JOURNAL
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if rec.get("op") == "saved":
            out.append(int(rec["step"]))
    return out


# ---- the harness side ----------------------------------------------------------------------------
def record_start(root: Path, where: Path) -> None:
    """Before an attempt: ``root``'s tree (entries of every directory, a copy of every file) into
    ``where`` (what survives of anything the attempt does not make durable)."""
    root, where = Path(root), Path(where)
    if where.exists():
        shutil.rmtree(where)
    (where / "files").mkdir(parents=True)
    dirs: dict[str, dict] = {}
    root_ino = None
    if root.is_dir():
        root_ino = root.stat().st_ino
        for d, subdirs, files in os.walk(root):
            st = os.stat(d)
            entries = {}
            for name in subdirs + files:
                s = os.stat(os.path.join(d, name), follow_symlinks=False)
                if stat.S_ISREG(s.st_mode) or stat.S_ISDIR(s.st_mode):
                    entries[name] = [s.st_ino, stat.S_ISDIR(s.st_mode)]
                if stat.S_ISREG(s.st_mode):
                    shutil.copyfile(os.path.join(d, name), where / "files" / str(s.st_ino))
            dirs[str(st.st_ino)] = entries
    (where / "start.json").write_text(json.dumps({"root_ino": root_ino, "dirs": dirs}))


def apply_power_loss(root: Path, start: Path, journal_dir: Path) -> dict:
    """Rebuild ``root`` as a power loss now would leave it (see the module docstring); returns what
    was lost: files whose content reverted or emptied, and directory entries that vanished or came back."""
    root, start, journal_dir = Path(root), Path(start), Path(journal_dir)
    begin = json.loads((start / "start.json").read_text())
    start_dirs = {int(k): v for k, v in begin["dirs"].items()}
    gen: dict[int, int] = {}
    dir_rec: dict[tuple, dict] = {}
    file_rec: dict[tuple, str] = {}
    path = journal_dir / JOURNAL
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # the record being written when the process died
        if rec["op"] == "saved":
            continue
        ino = rec["ino"]
        if rec["op"] == "dead":
            gen[ino] = gen.get(ino, 0) + 1
        elif rec["op"] == "dir":
            dir_rec[(ino, gen.get(ino, 0))] = {n: (i, gen.get(i, 0), d) for n, (i, d) in rec["entries"].items()}
        elif rec["op"] == "file":
            file_rec[(ino, gen.get(ino, 0))] = rec["blob"]
    root_ino = begin["root_ino"] if begin["root_ino"] is not None else (root.stat().st_ino if root.is_dir() else None)
    lost = {"files_reverted": 0, "files_emptied": 0, "entries_changed": 0}
    out = root.with_name(root.name + ".powerloss")
    if out.exists():
        shutil.rmtree(out)

    def entries_of(ident):
        if ident in dir_rec:
            return dir_rec[ident]
        ino, g = ident
        return {n: (i, 0, d) for n, (i, d) in start_dirs.get(ino, {}).items()} if g == 0 else {}

    def build(ident, dst: Path, live: Path | None, seen: set):
        dst.mkdir()
        seen.add(ident)
        entries = entries_of(ident)
        names_now = set(os.listdir(live)) if live is not None and live.is_dir() else set()
        lost["entries_changed"] += len(names_now ^ set(entries))
        for name, (ino, g, is_dir) in sorted(entries.items()):
            now = live / name if live is not None and name in names_now else None
            if is_dir:
                if (ino, g) not in seen:
                    build((ino, g), dst / name, now, seen)
                continue
            if (ino, g) in file_rec:
                shutil.copyfile(journal_dir / "blobs" / file_rec[(ino, g)], dst / name)
            elif g == 0 and (start / "files" / str(ino)).is_file():
                shutil.copyfile(start / "files" / str(ino), dst / name)
            else:
                (dst / name).write_bytes(b"")  # created and never fsynced
            if now is not None and now.is_file() and now.read_bytes() != (dst / name).read_bytes():
                lost["files_emptied" if (dst / name).stat().st_size == 0 else "files_reverted"] += 1

    if root_ino is None:
        return lost
    build((root_ino, 0), out, root, set())
    shutil.rmtree(root)
    os.rename(out, root)
    return lost


def main(argv: list[str] | None = None) -> int:
    """``python -m moelab.reliability.powerloss JOURNAL_DIR ROOT -- moelab-arguments ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--")
    journal_dir, root = argv[:split]
    install(Path(journal_dir), Path(root))
    import runpy

    sys.argv = ["moelab", *argv[split + 1:]]  # `python -m moelab.cli ...`, run by name: reliability sits below cli
    runpy.run_module("moelab.cli", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
