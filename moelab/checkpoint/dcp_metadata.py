"""A distributed checkpoint's own record of its files, read safely and checked against the directory.

DCP pickles its ``dcp/.metadata``; it is read here with an unpickler that admits DCP's own metadata
classes only (never arbitrary objects). Its ``storage_data`` names, for every saved tensor, the file
holding it (``__{rank}_{i}.distcp``, written by that rank). A checkpoint is complete only when every
file named there exists inside ``dcp/`` (a path leaving it is refused), is listed in the manifest, and
every rank's RNG file ``rng_rank{r}.pt`` exists: on node-local disks, or behind a stale NFS listing,
another rank's shards can be absent from the directory rank 0 sees.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch

from moelab.checkpoint.integrity import MANIFEST, unsafe_path
from moelab.checkpoint.layout import DCP_DIR, STATE_JSON
from moelab.errors import CheckpointError

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "torch": {"Size"},
}


_SHARD = re.compile(r"^__(\d+)_")  # DCP's FileSystemWriter names: __{rank}_{i}.distcp


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"DCP metadata refers to {module}.{name}, which is not a checkpoint metadata class; "
                              "moelab does not unpickle arbitrary objects (the file may be malicious)")


def read_dcp_metadata(dcp_dir: Path):
    """``dcp_dir/.metadata`` unpickled safely; its storage paths confined to ``dcp_dir``."""
    path = Path(dcp_dir) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; not a complete distributed checkpoint")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable DCP metadata ({e}); it may be truncated") from e
    problem = _shape_problem(metadata)
    if problem:
        raise CheckpointError(f"{path}: not DCP metadata ({problem}); the file was damaged or forged")
    for rel in storage_files(metadata):
        why = unsafe_path(Path(dcp_dir), rel)
        if why:
            raise CheckpointError(f"{path}: names the file {rel!r}, which is outside {dcp_dir} ({why}); refused "
                                  "(the metadata was damaged or forged)")
    return metadata


def _shape_problem(metadata) -> str | None:
    """Why an object unpickled (safely) from ``.metadata`` is not a usable DCP Metadata, or None: the
    unpickler admits DCP's classes, not that they are put together as DCP puts them."""
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        return f"a {type(metadata).__name__}, not a Metadata"
    if not isinstance(metadata.state_dict_metadata, dict):
        return f"its state_dict_metadata is a {type(metadata.state_dict_metadata).__name__}, not a dict"
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        return f"its storage_data is a {type(storage).__name__}, not a dict"
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str):
            return f"a storage entry {type(info).__name__} has no file name (relative_path {rel!r})"
    return None


def storage_files(metadata) -> list[str]:
    """The files (relative to ``dcp/``) that hold the checkpoint's tensors, by DCP's own metadata."""
    return sorted({info.relative_path for info in metadata.storage_data.values()})  # checked by read_dcp_metadata


def rank_files(dcp_dir: Path, rank: int) -> list[Path]:
    """The shard files DCP's FileSystemWriter wrote for ``rank``: ``__{rank}_{i}.distcp`` (the prefix is
    the rank's index in the global plan, torch.distributed.checkpoint.filesystem)."""
    return sorted(Path(dcp_dir).glob(f"__{rank}_*.distcp"))


def check_dcp_files(ckpt: Path, entries: dict | None = None) -> None:
    """Raise CheckpointError unless every file ``dcp/.metadata`` names and every rank's RNG file exist in
    ``ckpt`` and are listed in ``entries`` (default: the manifest's, when there is a readable one)."""
    ckpt = Path(ckpt)
    metadata = read_dcp_metadata(ckpt / DCP_DIR)
    try:
        world = json.loads((ckpt / STATE_JSON).read_text()).get("world", 1)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{ckpt / STATE_JSON}: unreadable ({e})") from e
    if not (isinstance(world, int) and not isinstance(world, bool) and world >= 1):
        raise CheckpointError(f"{ckpt / STATE_JSON}: 'world' is {world!r}, not a number of ranks (an int >= 1); "
                              "the file was damaged or edited")
    beyond = [rel for rel in storage_files(metadata) if (m := _SHARD.match(rel)) and int(m.group(1)) >= world]
    if beyond:
        rank = int(_SHARD.match(beyond[0]).group(1))
        raise CheckpointError(f"{ckpt}: {DCP_DIR}/.metadata names {', '.join(beyond[:3])} (written by rank {rank}), but "
                              f"{STATE_JSON} says {world} rank{'s' if world != 1 else ''} saved it; the two disagree "
                              "(damaged or mixed-up files): resume from an earlier checkpoint")
    if entries is None and (ckpt / MANIFEST).is_file():
        try:
            manifest = json.loads((ckpt / MANIFEST).read_text())
            entries = manifest["files"] if isinstance(manifest.get("files"), dict) else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            entries = None  # unreadable: integrity.check_directory reports it
    needed = [f"{DCP_DIR}/{rel}" for rel in storage_files(metadata)] + [rng_file(r) for r in range(world)]
    missing = [rel for rel in needed if not (ckpt / rel).is_file()]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(f"{ckpt}: the distributed checkpoint of {world} ranks is missing {shown} (named by "
                              f"{DCP_DIR}/.metadata or one per rank; written by another rank to a disk this process does "
                              "not see?); resume from an earlier checkpoint")
    if entries is not None:
        unlisted = [rel for rel in needed if rel not in entries]
        if unlisted:
            raise CheckpointError(f"{ckpt}: {', '.join(unlisted[:4])} not in the manifest, so never verified; "
                                  "resume from an earlier checkpoint")
