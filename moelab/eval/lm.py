"""Loss and perplexity of a model on held-out text, overall and per domain, with bootstrap confidence
intervals over documents (`moelab eval lm`, also `moelab eval SOURCE --data ...`).

Definition. Each document is tokenised with the model's tokenizer, followed by the eos token, and
cut into consecutive windows of at most ``seq_len`` tokens; in a window every token after the first
is predicted from the ones before it (the first token of a window is not scored, so a document of n
tokens + eos scores n + 1 - windows tokens). A document contributes its summed negative
log-likelihood ``nll_d`` and its scored token count ``n_d``; a domain's loss is
``sum nll_d / sum n_d`` over its documents (a token mean), its perplexity ``exp(loss)``.

Confidence intervals: documents are the independent units (tokens of one document are not), so
the ratio is recomputed on ``bootstrap`` resamples of the documents drawn with replacement (per
domain for the domain's interval, over all documents for the overall one), and the interval is the
2.5th and 97.5th percentiles (95%, percentile bootstrap).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from moelab.data.document import Document
from moelab.errors import DataError


@torch.no_grad()
def document_nll(model, tokenizer, docs: list[Document], seq_len: int, batch_size: int = 8,
                 progress: bool = False) -> list[tuple[str, float, int]]:
    """(domain, summed NLL in nats, scored tokens) of every document (see the module docstring)."""
    eos = tokenizer.eos_id
    windows: list[tuple[int, list[int]]] = []  # (document index, token ids)
    for i, d in enumerate(docs):
        ids = tokenizer.encode(d.text) + ([eos] if eos is not None else [])
        for s in range(0, len(ids), seq_len):
            w = ids[s:s + seq_len]
            if len(w) >= 2:
                windows.append((i, w))
    nll = [0.0] * len(docs)
    count = [0] * len(docs)
    order = sorted(range(len(windows)), key=lambda k: -len(windows[k][1]))  # similar lengths batch together
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows), desc="eval", unit="window")
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = [windows[k] for k in order[start:start + batch_size]]
        L = max(len(w) for _, w in chunk)
        ids = torch.full((len(chunk), L), eos or 0, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for r, (_, w) in enumerate(chunk):
            ids[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = 1
        logits = model(ids, attention_mask=mask if not bool(mask.all()) else None).logits[:, :-1].float()
        target = ids[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        ce = ce.view(len(chunk), L - 1).double() * mask[:, 1:]
        for r, (doc, w) in enumerate(chunk):
            nll[doc] += float(ce[r].sum())
            count[doc] += len(w) - 1
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return [(d.domain, nll[i], count[i]) for i, d in enumerate(docs) if count[i]]


def bootstrap_ratio(nll: np.ndarray, n: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile-bootstrap interval of sum(nll) / sum(n) over resampled documents."""
    if len(nll) < 2 or resamples <= 0:
        value = float(nll.sum() / n.sum())
        return value, value
    idx = rng.integers(0, len(nll), size=(resamples, len(nll)))
    ratios = nll[idx].sum(axis=1) / n[idx].sum(axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(rows: list[tuple[str, float, int]], resamples: int = 1000, seed: int = 0) -> dict:
    if not rows:
        raise DataError("no document had two or more tokens to score")
    rng = np.random.default_rng(seed)

    def one(sel):
        nll = np.array([r[1] for r in sel], dtype=np.float64)
        n = np.array([r[2] for r in sel], dtype=np.float64)
        loss = float(nll.sum() / n.sum())
        lo, hi = bootstrap_ratio(nll, n, resamples, rng)
        return {"loss": loss, "ppl": math.exp(loss), "loss_ci95": [lo, hi], "ppl_ci95": [math.exp(lo), math.exp(hi)],
                "tokens": int(n.sum()), "documents": len(sel)}

    out = {"overall": one(rows), "domains": {}}
    for dom in sorted({r[0] for r in rows}):
        out["domains"][dom] = one([r for r in rows if r[0] == dom])
    out["bootstrap_resamples"] = resamples
    return out


def eval_lm(source: str, out: str | None, data: str = "builtin", split: str = "val", seq_len: int | None = None,
            max_documents: int | None = None, resamples: int = 1000, seed: int = 0, batch_size: int = 8,
            progress: bool = True) -> dict:
    """`moelab eval lm`: load SOURCE (moelab run / checkpoint / model, or HF directory), score the
    documents of ``data`` (``split``: val, train or all), write result.json, report.md/.html and
    plots/ppl_by_domain.png into ``out``."""
    from pathlib import Path

    from moelab.data import load_corpus
    from moelab.errors import ConfigError
    from moelab.loading import load, load_tokenizer

    if split not in ("val", "train", "all"):
        raise ConfigError("--split", split, "must be val, train or all")
    model, tok = load(source), load_tokenizer(source)
    seq_len = seq_len or model.config.max_seq_len
    if not 2 <= seq_len <= model.config.max_seq_len:
        raise ConfigError("--seq-len", seq_len, f"must be in [2, max_seq_len={model.config.max_seq_len}]")
    corpus = load_corpus(data, seed=0)
    docs = {"val": corpus.val, "train": corpus.train, "all": [*corpus.train, *corpus.val]}[split]
    if not docs:
        raise DataError(f"data {data!r}: the {split} split has no documents; use --split all")
    if max_documents:
        docs = docs[:max_documents]
    rows = document_nll(model, tok, docs, seq_len, batch_size=batch_size, progress=progress)
    result = {"source": str(source), "data": data, "split": split, "seq_len": seq_len, "seed": seed,
              **summarize(rows, resamples, seed)}
    if out:
        from moelab.eval.report import write_lm_report

        write_lm_report(Path(out), result)
    return result
