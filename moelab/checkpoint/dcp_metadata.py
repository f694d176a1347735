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
    for rel in storage_files(metadata):
        why = unsafe_path(Path(dcp_dir), rel)
        if why:
            raise CheckpointError(f"{path}: names the file {rel!r}, which is outside {dcp_dir} ({why}); refused "
                                  "(the metadata was damaged or forged)")
    return metadata


def storage_files(metadata) -> list[str]:
    """The files (relative to ``dcp/``) that hold the checkpoint's tensors, by DCP's own metadata."""
    storage = getattr(metadata, "storage_data", None) or {}
    return sorted({str(getattr(info, "relative_path", info)) for info in storage.values()})


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
        world = int(json.loads((ckpt / STATE_JSON).read_text()).get("world", 1))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{ckpt / STATE_JSON}: unreadable ({e})") from e
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
