"""Perplexity against context length (Mixtral paper §3, Fig. 4: perplexity falls as the context grows).

Definition. Held-out documents are tokenised with the model's own tokenizer and cut into windows of
W = max(--lengths) consecutive tokens of one document (non-overlapping, from the document's start; a
shorter document gives none, so every position is averaged over the same windows). In a window the
token at position c (0-based) is predicted from the c tokens before it; ``loss[c]`` is its
cross-entropy averaged over windows, for c = 1 .. W - 1. For sorted lengths L_1 < ... < L_k:

- ``bucket`` L_j: the mean of loss[c] over L_{j-1} <= c < L_j (L_0 = 1): tokens that had between
  L_{j-1} and L_j - 1 tokens of context;
- ``window`` L_j: the mean over 1 <= c < L_j, the perplexity of an L_j-token window (what a model
  evaluated on L_j-token sequences reports; Mixtral's curve is of this kind).

Both are means over tokens (every window weighs the same) and are reported as perplexity exp(loss).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moelab.data.document import Document
from moelab.errors import ConfigError, DataError


def check_lengths(lengths: list[int], max_seq_len: int) -> list[int]:
    if not lengths:
        raise ConfigError("--lengths", "", "give at least one context length, e.g. --lengths 64,128,256")
    bad = [n for n in lengths if n < 2]
    if bad:
        raise ConfigError("--lengths", bad, "a context length is at least 2 tokens (one to read, one to predict)")
    if max(lengths) > max_seq_len:
        raise ConfigError("--lengths", max(lengths), f"longer than the model's max_seq_len={max_seq_len}; "
                                                     f"give lengths <= {max_seq_len}")
    return sorted(set(lengths))


def read_eval_documents(data: str) -> tuple[list[Document], str]:
    """builtin: the built-in corpus's validation split (held out of every moelab training run); a path:
    every document of the file or directory (moelab cannot know what the model was trained on)."""
    from moelab.data import load_corpus
    from moelab.data.userdata import read_documents

    if data == "builtin":
        return list(load_corpus("builtin").val), "the built-in corpus's validation split"
    return read_documents(Path(data)), f"every document of {data}"


def context_windows(tokenizer, docs: list[Document], window: int, max_windows: int | None = None
                    ) -> tuple[list[list[int]], list[str], int, int]:
    """Windows of exactly ``window`` tokens and the domain of each; taken round-robin over documents
    (every document's first window, then every second one ...) so ``max_windows`` spreads over documents.
    Also returns how many documents gave a window and the longest document's token count (for the
    error when none is long enough)."""
    per_doc, longest = [], 0
    for d in docs:
        ids = tokenizer.encode(d.text, add_special_tokens=True)  # exactly as tokenizer.json encodes
        longest = max(longest, len(ids))
        per_doc.append([(ids[s:s + window], d.domain, len(per_doc))
                        for s in range(0, len(ids) - window + 1, window)])
    picked = []
    for r in range(max((len(w) for w in per_doc), default=0)):
        picked += [w[r] for w in per_doc if r < len(w)]
    picked = picked[:max_windows] if max_windows else picked
    return [p[0] for p in picked], [p[1] for p in picked], len({p[2] for p in picked}), longest


@torch.no_grad()
def position_losses(model, windows_NW: torch.Tensor, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Cross-entropy (N, W) of token c of each window given tokens 0 .. c - 1 (column 0 is NaN: no context)."""
    from tqdm.auto import tqdm

    model.eval()
    N, W = windows_NW.shape
    out = torch.full((N, W), float("nan"), dtype=torch.float64)
    with tqdm(total=N, desc="context", unit="window", disable=not progress, dynamic_ncols=True) as bar:
        for s in range(0, N, batch_size):
            ids_BW = windows_NW[s:s + batch_size]
            logits_BWV = model(ids_BW).logits.float()
            ce = F.cross_entropy(logits_BWV[:, :-1].transpose(1, 2), ids_BW[:, 1:], reduction="none")  # (B, W-1)
            out[s:s + len(ids_BW), 1:] = ce.double()
            bar.update(len(ids_BW))
    return out


def summarise(loss_NW: torch.Tensor, lengths: list[int]) -> dict:
    """Per-position mean loss and the bucket / window means of the module docstring."""
    mean_W = loss_NW.mean(0)  # NaN at position 0
    rows, lo = [], 1
    for L in lengths:
        bucket = mean_W[lo:L]
        window = mean_W[1:L]
        rows.append({"length": L, "bucket": [lo, L - 1], "bucket_tokens": int(bucket.numel() * loss_NW.shape[0]),
                     "bucket_loss": float(bucket.mean()), "bucket_ppl": math.exp(float(bucket.mean())),
                     "window_loss": float(window.mean()), "window_ppl": math.exp(float(window.mean()))})
        lo = L
    return {"rows": rows, "per_position_loss": [None] + [float(v) for v in mean_W[1:]]}


def eval_context(source: str | Path, out: str | Path, lengths: list[int], data: str = "builtin",
                 max_windows: int | None = 512, batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity against context length of ``source`` (see the module docstring); writes result.json,
    report.md / report.html and plots/ into ``out`` and returns the result."""
    from moelab.eval.report import write_context_report
    from moelab.loading import load, load_tokenizer

    t0 = time.perf_counter()
    if max_windows is not None and max_windows <= 0:
        raise ConfigError("--max-windows", max_windows, "must be a positive number of windows")
    model = load(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    lengths = check_lengths(lengths, model.config.max_seq_len)
    docs, where = read_eval_documents(data)
    W = lengths[-1]
    windows, domains, used, longest = context_windows(tokenizer, docs, W, max_windows)
    if not windows:
        raise DataError(f"--data {data}: no document has {W} tokens (the longest has {longest}); give shorter "
                        f"--lengths (at most {longest}) or longer documents")
    loss_NW = position_losses(model, torch.tensor(windows), batch_size, progress)
    result = {"source": str(source), "data": data, "documents": where, "lengths": lengths, "window": W,
              "windows": len(windows), "documents_used": used, **summarise(loss_NW, lengths)}
    result["domains"] = {}
    for dom in sorted(set(domains)):
        rows = [i for i, d in enumerate(domains) if d == dom]
        result["domains"][dom] = {"windows": len(rows), **summarise(loss_NW[rows], lengths)}
    result["seconds"] = time.perf_counter() - t0
    write_context_report(Path(out), result)
    return result
