"""Export a moelab model as a Hugging Face model directory that ``transformers`` loads.

Writes config.json, model.safetensors (per-expert keys, the layout published checkpoints use) and
the tokenizer files the model came with. A model loaded from HF goes back to its own family; a
moelab-native model goes to the first family (``EXPORT_ORDER``) that expresses it exactly, and if
none does the error lists, per family, the features that family lacks.
Training-only settings no HF config holds (router z-loss) are dropped with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelab.checkpoint.atomic import atomic_directory, check_replaceable
from moelab.checkpoint.model_files import model_state
from moelab.checkpoint.run import resolve_checkpoint
from moelab.errors import MoelabError
from moelab.interop.hf.families import HF_CONFIG, choose_family
from moelab.model import MoETransformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")
# Fields of the source config.json carried over unchanged when exporting back to the same family.
CARRIED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


def export_hf(model: MoETransformer, out_dir: str | os.PathLike, family: str | None = None,
              force: bool = False) -> Path:
    """Write ``model`` to ``out_dir`` as an HF checkpoint; returns the directory.

    ``family`` forces an HF model_type; by default the model's source family, else the first that fits.
    An existing ``out_dir`` is replaced only when it is an earlier export whose files moelab wrote and
    nobody changed since, or ``force`` is given; a plain file or a symbolic link there is an error
    (:func:`moelab.checkpoint.atomic.check_replaceable`)."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, force, kind="hf-export")  # before any work
    cfg = model.config
    source = getattr(model, "hf_config", None) or {}
    adapter, fields = choose_family(cfg, family, preferred=source.get("model_type"))
    if cfg.moe is not None and cfg.moe.router.loss_coefs()["z_loss"] > 0:
        warnings.warn(f"router z-loss (coef {cfg.moe.router.loss_coefs()['z_loss']}) is training-only and has no "
                      f"{adapter.model_type} config field; it is not exported", stacklevel=2)
    for what in adapter.dropped_settings(cfg):
        warnings.warn(f"{what} is training-only and has no {adapter.model_type} config field; it is not exported",
                      stacklevel=2)
    state = model_state(model)
    rules = adapter.rules(cfg, set(state))
    used = {k for r in rules for k in r.ml}
    left = sorted(set(state) - used)
    if left:
        raise MoelabError(f"{adapter.model_type} export has no HF key for moelab tensors {left[:5]}")
    tensors: dict[str, torch.Tensor] = {}
    for r in rules:
        for k, t in zip(r.hf, r.to_hf([state[m] for m in r.ml])):
            tensors[k] = t.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
    dtype = model.embed.weight.dtype
    config = {"architectures": [adapter.architecture], "model_type": adapter.model_type, **fields,
              "dtype": _DTYPE_NAMES.get(dtype, "float32")}
    if source.get("model_type") == adapter.model_type:
        config.update({k: source[k] for k in CARRIED_FIELDS if k in source})
    src_dir = getattr(model, "source_dir", None)
    tok_json = _tokenizer_file(src_dir, "tokenizer.json")
    special = _special_tokens(tok_json) if tok_json is not None and _tokenizer_file(
        src_dir, "tokenizer_config.json") is None else None
    if special is not None:  # moelab's own tokenizer: end of document = eos = bos = pad (issue 24)
        for k in CARRIED_FIELDS:
            if config.get(k) is None:
                config[k] = special["id"]
    with atomic_directory(out_dir, kind="hf-export", force=force) as tmp:
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            found = _tokenizer_file(src_dir, name)
            if found is not None:
                shutil.copy2(found, tmp / name)
        if special is not None:
            t = special["token"]
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": t, "bos_token": t, "pad_token": t,
                 "model_max_length": cfg.max_seq_len}, indent=2) + "\n")
            (tmp / "special_tokens_map.json").write_text(json.dumps(
                {"eos_token": t, "bos_token": t, "pad_token": t}, indent=2) + "\n")
        gen = {k: config[k] for k in CARRIED_FIELDS if config.get(k) is not None}
        if gen and _tokenizer_file(src_dir, "generation_config.json") is None:
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir


def _special_tokens(tokenizer_json: Path) -> dict | None:
    """The end-of-document token of a moelab tokenizer (``moelab.data.tokenizer.EOS``), or None."""
    from tokenizers import Tokenizer as HFTokenizer

    from moelab.data.tokenizer import EOS

    try:
        i = HFTokenizer.from_file(str(tokenizer_json)).token_to_id(EOS)
    except Exception:  # not a tokenizers file (a stub, another format): nothing to name
        return None
    return None if i is None else {"token": EOS, "id": i}


def _tokenizer_file(src_dir, name: str) -> Path | None:
    """``name`` beside the model the way it was loaded: its directory, or a run's latest checkpoint."""
    if src_dir is None:
        return None
    candidates = [Path(src_dir)]
    if (Path(src_dir) / "checkpoints").is_dir():
        candidates.insert(0, resolve_checkpoint(src_dir))
    for c in candidates:
        if (c / name).is_file():
            return c / name
    return None
