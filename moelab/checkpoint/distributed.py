"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards,
and any other layout (another number of ranks, another ep, or one process) reads them back.

``checkpoints/step_000100/`` of a multi-process run holds
- ``dcp/``: the DCP files (``.metadata`` + one ``.distcp`` per rank): model weights under ``model.``
  and AdamW's state under ``optim.``, tensors only, each with its full (unsharded) shape and name;
- ``config.yaml``, ``run_config.yaml``, ``tokenizer.json`` as in a single-process checkpoint;
- ``trainer_state.json``: step, data position, the scheduler's state, the optimizer's hyper-parameters
  and the layout that saved it;
- ``rng_rank{r}.pt``: each rank's RNG state (tensors, read with ``weights_only=True``).
It is written into a temp directory and renamed by rank 0 after every rank has finished, so a
checkpoint directory is either complete or absent.

Scale: each rank fsyncs and hashes its own files (its ``.distcp`` shards and RNG file), all at once,
and rank 0 gathers the digests into the manifest, so a save costs one rank's share of the hashing
(``moelab bench ckpt`` projects it for a 671B model) and no rank waits while another hashes every
shard. Before the manifest is written every file ``dcp/.metadata`` names and every rank's RNG file
must be there (:mod:`moelab.checkpoint.dcp_metadata`); then ``dcp/`` and the temp directory are
fsynced and renamed. Resume and rollback choose the checkpoint together (each rank hashes a share of
every candidate, rank 0 decides), see :func:`moelab.checkpoint.run.choose_checkpoint`.

Safe loading: DCP pickles its ``.metadata`` and would unpickle non-tensor entries. moelab saves
tensors only, reads the metadata with an unpickler that admits DCP's own metadata classes and
nothing else, and refuses a checkpoint holding pickled objects.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from moelab.checkpoint.atomic import write_marker
from moelab.checkpoint.dcp_metadata import check_dcp_files, rank_files, read_dcp_metadata, rng_file
from moelab.checkpoint.integrity import file_digest, write_manifest
from moelab.checkpoint.layout import CHECKPOINTS, CONFIG, DCP_DIR, STATE_JSON
from moelab.checkpoint.run import prune
from moelab.config import save_config
from moelab.errors import CheckpointError
from moelab.fileio import fsync_dir, fsync_path, make_dirs


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata unpickler admits DCP's metadata classes only, which refuses
    pickled (non-tensor) entries and file names leaving ``dcp/``, so loading never runs code from the
    checkpoint nor reads outside it."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        metadata = read_dcp_metadata(Path(self.path))
        pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if pickled:
            raise CheckpointError(f"{path}: entries {pickled[:3]} are pickled objects; moelab checkpoints hold "
                                  "tensors only and never unpickle")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"torch_rng": torch.get_rng_state(), "python_rng": [version, list(internal), gauss]}


def _tensor_state(model, optimizer) -> tuple[dict, list | None]:
    """(the tensors DCP saves or fills: weights and optimizer state by name, the optimizer's param
    groups: hyper-parameters, saved as JSON). Every rank calls it (it may communicate)."""
    state = {"model": get_model_state_dict(model)}
    groups = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        state["optim"], groups = osd["state"], osd["param_groups"]
    return state, groups


def _own_files(tmp: Path, rank: int) -> dict[str, dict]:
    """This rank's files in the checkpoint (its DCP shards and RNG file), fsynced and hashed here, in
    parallel with every other rank: {relative path: {size, sha256}}."""
    entries = {}
    for p in [*rank_files(tmp / DCP_DIR, rank), tmp / rng_file(rank)]:
        fsync_path(p)
        size, digest = file_digest(p)
        entries[p.relative_to(tmp).as_posix()] = {"size": size, "sha256": digest}
    return entries


def _gather_to_main(obj, env) -> list | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    out = [None] * env.world if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _broadcast_from_main(obj, env):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_distributed_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, position, run_config,
                                tokenizer, keep_last: int, env, extra: dict | None = None) -> Path:
    """Every rank calls this: each writes, fsyncs and hashes its own shards and RNG file; rank 0 writes
    the small files, checks the directory against ``dcp/.metadata``, writes the manifest from the
    gathered digests and publishes the directory. A failure on any rank raises on every rank."""
    root = Path(run_dir) / CHECKPOINTS
    target = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp-dcp"
    error = None
    if env.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            make_dirs(tmp)  # checkpoints/ durable in the run directory
        except Exception as e:  # the others are waiting: tell them (this broadcast is also the barrier)
            error = f"could not write checkpoint {target.name}: {type(e).__name__}: {e}"
    error = _broadcast_from_main(error, env)
    if error:
        raise CheckpointError(error)
    state, groups = _tensor_state(model, optimizer)
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR)))  # fsyncs each shard
    except BaseException:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:  # any failure here is reported to rank 0, which tells every rank: none waits for the timeout
        torch.save(_rng_state(), tmp / rng_file(env.rank))
        mine: dict | str = _own_files(tmp, env.rank)
    except Exception as e:
        mine = f"rank {env.rank}: {type(e).__name__}: {e}"
    gathered = _gather_to_main(mine, env)
    failure = None
    if env.is_main:
        try:
            failed = [g for g in gathered if isinstance(g, str)]
            if failed:
                raise CheckpointError(f"could not flush or hash the shards of {'; '.join(failed)}")
            save_config(model.config if hasattr(model, "config") else run_config.model, tmp / CONFIG)
            run_config.save(tmp / "run_config.yaml")
            tokenizer.save(tmp / "tokenizer.json")
            meta = {"step": step, "epoch": position.epoch, "index": position.index, "format": "dcp",
                    "world": env.world, "dp": env.dp, "ep": env.ep, "scheduler": scheduler.state_dict(),
                    "param_groups": groups, **(extra or {})}
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
            known = {rel: e for g in gathered for rel, e in g.items()}
            check_dcp_files(tmp, entries=known)  # every shard .metadata names and every RNG file, hashed
            write_marker(tmp, "checkpoint")  # .moelab, as in every directory moelab writes whole
            write_manifest(tmp, known=known)  # hashes the small files; fsyncs them, dcp/ and tmp/
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
                fsync_dir(root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            fsync_dir(root)
        except Exception as e:  # any failure, not only a disk's: the others are waiting for the verdict
            shutil.rmtree(tmp, ignore_errors=True)
            failure = e
            error = f"could not write checkpoint {target.name}: " + (
                str(e) if isinstance(e, (OSError, CheckpointError)) else f"{type(e).__name__}: {e}")
    error = _broadcast_from_main(error, env)
    if error:
        raise CheckpointError(error) from failure
    pruned = None
    if env.is_main:
        try:
            prune(run_dir, keep_last)
        except Exception as e:  # the checkpoint is saved; an old one left behind is no reason to stop
            pruned = f"{root}: could not delete old checkpoints ({type(e).__name__}: {e}); they are kept"
    env.barrier()
    if pruned:
        warnings.warn(pruned, stacklevel=2)
    return target



def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(ckpt) / STATE_JSON}: unreadable ({e})") from e


def load_distributed_checkpoint(ckpt: Path, model, optimizer=None, scheduler=None, rank: int = 0) -> dict:
    """Read a DCP checkpoint into ``model`` (plain, or already parallelized in any layout) and, when
    given, ``optimizer`` and ``scheduler``; restores this rank's RNG state. Returns the meta dict."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    state, _ = _tensor_state(model, optimizer)
    reader = SafeReader(str(ckpt / DCP_DIR))
    reader.read_metadata()  # refuses unsafe metadata here, with moelab's message, before DCP wraps it
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=not is_initialized())
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{ckpt / DCP_DIR}: could not read the distributed checkpoint ({e}); it may be "
                              "truncated or written by another model config") from e
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
        set_optimizer_state_dict(model, optimizer, {"state": state["optim"], "param_groups": groups})
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if optimizer is not None:  # training resumes: this rank's RNG (a rank beyond the saved world reuses the last)
        saved_world = int(meta.get("world", 1))
        rng = ckpt / rng_file(min(rank, saved_world - 1))
        if not rng.is_file():
            raise CheckpointError(f"{rng}: missing; the checkpoint of {saved_world} ranks is incomplete, resume "
                                  "from an earlier checkpoint")
        try:
            s = torch.load(rng, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{rng}: unreadable RNG state ({e}); it may be truncated") from e
        torch.set_rng_state(s["torch_rng"])
        version, internal, gauss = s["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    return meta


def full_optimizer_state(model, optimizer) -> dict:
    """A single-process optimizer's state keyed by parameter name, for loading into another layout."""
    return get_optimizer_state_dict(model, optimizer)


def load_full_optimizer_state(model, optimizer, full: dict) -> None:
    """Shard a full (single-process) optimizer state into a parallelized model's optimizer."""
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()
