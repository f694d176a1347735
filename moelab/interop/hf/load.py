"""Lazy loading of an HF safetensors checkpoint into a moelab model.

The model is built on the meta device, given uninitialised storage with ``to_empty``, and filled
tensor by tensor while the shards are read one at a time through ``safe_open`` (memory-mapped), so
peak memory is about the weights themselves. Before any storage is allocated, the headers of all
shards are checked against the key rules: every checkpoint key must be consumed, every expected key
present, every shape right. After filling, every moelab parameter must have been written. Any
failure raises CheckpointError and no model is returned. Weights are never unpickled.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moelab.checkpoint.model_files import model_state
from moelab.errors import CheckpointError
from moelab.interop.hf.families import HF_CONFIG, get_adapter, hf_config_to_model_config, read_hf_config
from moelab.model import MoETransformer, build_model

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory}: weights are pickled ({', '.join(pickles[:3])}); moelab never unpickles files, since "
            "loading a pickle can run arbitrary code. Convert them to safetensors once, on a machine you trust, "
            "e.g. `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)` with transformers "
            "(it writes model.safetensors), then load out_dir")
    raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX}; an HF model directory needs safetensors weights")


def weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard paths, and the index's key -> file map when the checkpoint is sharded."""
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{directory / INDEX}: not a safetensors index ({e})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(f"{directory}: shard(s) listed in {INDEX} are missing: {', '.join(missing)}; "
                                  "the download is incomplete")
        return [directory / n for n in names], weight_map
    if (directory / SINGLE).is_file():
        return [directory / SINGLE], None
    _refuse_pickles(directory)
    raise AssertionError  # pragma: no cover


def _open(shard: Path):
    try:
        return safe_open(str(shard), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{shard}: not a readable safetensors file ({e}); it may be truncated or "
                              "corrupt, download it again") from e


def read_headers(shards: list[Path], weight_map: dict[str, str] | None) -> dict[str, tuple[Path, tuple, str]]:
    """key -> (shard, shape, dtype name) from the shard headers only (no tensor data read)."""
    headers: dict[str, tuple[Path, tuple, str]] = {}
    for shard in shards:
        with _open(shard) as f:
            for k in f.keys():
                if k in headers:
                    raise CheckpointError(f"{shard}: tensor {k} also stored in {headers[k][0].name}")
                sl = f.get_slice(k)
                headers[k] = (shard, tuple(sl.get_shape()), sl.get_dtype())
    if weight_map is not None:
        wrong = sorted(k for k, name in weight_map.items() if k not in headers or headers[k][0].name != name)
        if wrong:
            raise CheckpointError(f"{shards[0].parent / INDEX}: {len(wrong)} key(s) not found in the shard the index "
                                  f"names, e.g. {wrong[:3]}; a shard is stale or truncated")
    return headers


def _names(keys: list[str], n: int = 8) -> str:
    return f"{keys[:n]}{f' and {len(keys) - n} more' if len(keys) > n else ''}"


def _check_copies(copies: list, targets: dict, filled: set[str], directory: Path) -> None:
    """Each stored copy whose original is loaded must equal it; checked copies leave the list (memory)."""
    ready = [c for c in copies if c[1] in filled]
    copies[:] = [c for c in copies if c[1] not in filled]
    for k, ml, t in ready:
        if not torch.equal(t.to(targets[ml].dtype), targets[ml].detach().cpu()):
            raise CheckpointError(f"{directory}: tensor {k} is a copy of the one moelab loads as {ml} (moelab shares "
                                  "it) but differs from it; make them equal or drop the copy")


def load_hf(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            progress: bool = True) -> MoETransformer:
    """Load an HF model directory (config.json + safetensors) as a moelab model in eval mode.

    ``dtype=None`` keeps the checkpoint's dtype (that of most of its tensors)."""
    directory = Path(path)
    data = read_hf_config(directory)
    adapter = get_adapter(data.get("model_type"))
    cfg = hf_config_to_model_config(data, where=str(directory / HF_CONFIG))
    shards, weight_map = weight_files(directory)
    headers = read_headers(shards, weight_map)
    cfg = adapter.fit_checkpoint(cfg, set(headers))

    meta = build_model(cfg, device="meta")
    ml_shapes = {k: tuple(v.shape) for k, v in model_state(meta).items()}
    rules = adapter.rules(cfg, set(ml_shapes))
    expected: dict[str, tuple] = {}
    key_rule: dict[str, int] = {}
    for r_idx, r in enumerate(rules):
        outs = r.to_hf([torch.empty(ml_shapes[k], device="meta") for k in r.ml])
        for k, t in zip(r.hf, outs):
            expected[k], key_rule[k] = tuple(t.shape), r_idx
    # A tied checkpoint may still store the head; it must then equal the embedding (checked below).
    optional = {k for k in ("lm_head.weight",) if cfg.tie_embeddings and k not in expected}
    missing = sorted(set(expected) - set(headers))
    unexpected = sorted(set(headers) - set(expected) - optional)
    if missing or unexpected:
        raise CheckpointError(f"{directory}: checkpoint keys do not match config.json ({adapter.model_type}): "
                              f"missing {_names(missing)}, unexpected {_names(unexpected)}")
    for k, shape in expected.items():
        if headers[k][1] != shape:
            raise CheckpointError(f"{headers[k][0]}: tensor {k} has shape {headers[k][1]}, config.json implies {shape}")
    if dtype is None:
        common = Counter(h[2] for h in headers.values()).most_common(1)[0][0]
        if common not in _DTYPES:
            raise CheckpointError(f"{directory}: tensors are {common}; pass dtype= to choose a floating-point dtype")
        dtype = _DTYPES[common]

    model = meta.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives each module its own storage; tie again
        model.lm_head.weight = model.embed.weight
    targets = dict(model.state_dict(keep_vars=True))
    filled: set[str] = set()
    pending: dict[int, dict[str, torch.Tensor]] = {}
    arrived: Counter = Counter()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers/huggingface_hub
        def tqdm(it, **kw):
            return it
    deferred_head = None
    copies: list[tuple[str, str, torch.Tensor]] = []  # (HF key, moelab key, tensor) of duplicate rules
    with torch.no_grad():
        for shard in tqdm(shards, desc=f"loading {directory.name}", unit="shard", disable=not progress):
            with _open(shard) as f:
                for k in f.keys():
                    try:
                        t = f.get_tensor(k)
                    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                        raise CheckpointError(f"{shard}: tensor {k} could not be read ({e}); the file may be "
                                              "truncated") from e
                    if k in optional:
                        deferred_head = t
                        continue
                    r_idx = key_rule[k]
                    r = rules[r_idx]
                    if r.duplicate:  # a second copy of a tensor another rule fills: checked, never written
                        copies.append((k, r.ml[0], t))
                        _check_copies(copies, targets, filled, directory)
                        continue
                    if r.stacked:  # copy expert j straight into row j of the stacked parameter
                        targets[r.ml[0]][r.hf.index(k)].copy_(t)
                        arrived[r_idx] += 1
                        if arrived[r_idx] == len(r.hf):
                            filled.add(r.ml[0])
                        continue
                    bucket = pending.setdefault(r_idx, {})
                    bucket[k] = t
                    if len(bucket) == len(r.hf):
                        outs = r.to_ml([bucket[h] for h in r.hf], [ml_shapes[m] for m in r.ml])
                        for m, out in zip(r.ml, outs):
                            targets[m].copy_(out)
                            filled.add(m)
                        del pending[r_idx]
        _check_copies(copies, targets, filled, directory)
        unfilled = sorted(set(ml_shapes) - filled)
        if unfilled:  # pragma: no cover - the key check above makes this unreachable
            raise CheckpointError(f"{directory}: moelab parameters not filled: {_names(unfilled)}")
        if deferred_head is not None and not torch.equal(deferred_head.to(dtype), model.embed.weight.cpu()):
            raise CheckpointError(f"{directory}: tie_word_embeddings is true but lm_head.weight differs from the "
                                  "embedding; set tie_word_embeddings to false")
    model.hf_config = data  # remembered for export (family, token ids)
    model.source_dir = directory  # export copies the tokenizer files from here
    return model.eval()
