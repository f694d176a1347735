"""Documents labelled by domain: the built-in corpus and user corpora, split by document.

The train/validation split is a function of each document's ``doc_id`` alone (a SHA-256 hash below
``val_fraction`` goes to validation), so adding documents never moves an old one across the split,
and the same corpus splits the same way on every machine. ``seed`` only orders the documents (and
generates the ``math`` domain).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from moelab.fileio import write_atomic
from moelab.data.document import Document
from moelab.data.sources import MAX_DOC_CHARS, MIN_DOC_CHARS, SOURCES, stable_hash
from moelab.data.userdata import read_documents
from moelab.errors import DataError

# Bump when the built-in sources change, so stale caches are rebuilt instead of reused.
BUILTIN_VERSION = 2
# Characters per built-in domain, chosen so the domains have similar token counts (~1M tokens in all
# at vocab 2048); `prose` is all the help topics and the docstrings of two thirds of the stdlib.
DOMAIN_CHARS = {"code": 1_000_000, "prose": 1_000_000, "math": 750_000}  # math: fewer chars per token
DEFAULT_VAL_FRACTION = 0.05


@dataclass
class Corpus:
    train: list[Document]
    val: list[Document]

    @property
    def domains(self) -> list[str]:
        """Sorted names of the domains present in either split."""
        return sorted({d.domain for d in self.train} | {d.domain for d in self.val})

    def fingerprint(self) -> str:
        """SHA-256 over every split, domain, id and text: equal fingerprints mean equal corpora."""
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("val", self.val)):
            for d in docs:
                for part in (split, d.domain, d.doc_id, d.text):
                    h.update(part.encode("utf-8"))
                    h.update(b"\0")
        return h.hexdigest()


def default_cache_dir() -> Path:
    """``$MOELAB_CACHE`` if set, else ``~/.cache/moelab``."""
    env = os.environ.get("MOELAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "moelab"


def _val_score(doc_id: str) -> float:
    return stable_hash(f"split:{doc_id}") / 2**64


def split_documents(docs: list[Document], val_fraction: float, seed: int = 0) -> Corpus:
    """Split by a hash of ``doc_id``; order each split by a seeded hash.

    A domain with >= 2 documents always has at least one in each split (the document with the
    lowest, resp. highest, score moves), so per-domain validation is never empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction!r}: must be in [0, 1)")
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"document id {dup!r} appears twice; every document needs a unique id")
    val_ids = {d.doc_id for d in docs if _val_score(d.doc_id) < val_fraction}
    if val_fraction > 0:
        for domain in sorted({d.domain for d in docs}):
            mine = sorted((d for d in docs if d.domain == domain), key=lambda d: _val_score(d.doc_id))
            if len(mine) < 2:
                continue
            if not any(d.doc_id in val_ids for d in mine):
                val_ids.add(mine[0].doc_id)
            if all(d.doc_id in val_ids for d in mine):
                val_ids.discard(mine[-1].doc_id)

    def order(ds: list[Document]) -> list[Document]:
        return sorted(ds, key=lambda d: (stable_hash(f"{seed}:order:{d.doc_id}"), d.doc_id))

    return Corpus(train=order([d for d in docs if d.doc_id not in val_ids]),
                  val=order([d for d in docs if d.doc_id in val_ids]))


def build_builtin_documents(seed: int = 0, max_docs_per_domain: int | None = None) -> list[Document]:
    """The built-in documents, domain by domain, each domain capped at ``DOMAIN_CHARS`` characters."""
    docs = []
    for domain, source in SOURCES.items():
        chars = 0
        for n, (doc_id, text) in enumerate(source(seed)):
            if chars >= DOMAIN_CHARS[domain] or (max_docs_per_domain is not None and n >= max_docs_per_domain):
                break
            docs.append(Document(text=text, domain=domain, doc_id=doc_id))
            chars += len(text)
    return docs


def _cache_path(cache_dir: Path, seed: int, max_docs_per_domain: int | None) -> Path:
    """One file per Python version, seed, cap and build parameters (so a changed budget rebuilds)."""
    py = ".".join(platform.python_version_tuple())
    cap = "" if max_docs_per_domain is None else f"-max{max_docs_per_domain}"
    params = json.dumps([BUILTIN_VERSION, DOMAIN_CHARS, MAX_DOC_CHARS, MIN_DOC_CHARS], sort_keys=True)
    tag = hashlib.sha256(params.encode()).hexdigest()[:8]
    return cache_dir / f"builtin-py{py}-seed{seed}{cap}-{tag}.jsonl"


def _read_cache(path: Path) -> list[Document] | None:
    """The cached documents, or None when the file is absent or unreadable (then it is rebuilt)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        docs = [Document(**json.loads(line)) for line in lines[1:]]
    except (OSError, ValueError, TypeError, IndexError):
        return None
    if header.get("documents") != len(docs):
        return None  # truncated
    return docs


def builtin_corpus(cache_dir: str | Path | None = None, seed: int = 0, max_docs_per_domain: int | None = None,
                   val_fraction: float = DEFAULT_VAL_FRACTION) -> Corpus:
    """The built-in ``code`` / ``math`` / ``prose`` corpus, built from the running Python and cached.

    The cache (one JSONL file per Python version, seed and cap, under ``cache_dir``, default
    :func:`default_cache_dir`) holds the documents; the split is recomputed on load. A cache that
    cannot be written (read-only home) is skipped silently: the build takes a few seconds.
    """
    return split_documents(builtin_documents(cache_dir, seed, max_docs_per_domain), val_fraction, seed)


def builtin_fingerprint(seed: int = 0, cache_dir: str | Path | None = None) -> dict:
    """What identifies the built-in corpus a run trains on: it is generated from the running Python's
    standard library, so a new Python (or moelab build setting) can change it. ``size`` and ``sha256``
    are of its documents (text, domain, id), beside the corpus version, Python version and build
    settings; in the form of a data file's fingerprint (moelab.train.resume)."""
    h, size = hashlib.sha256(), 0
    for d in builtin_documents(cache_dir, seed):
        line = (json.dumps([d.text, d.domain, d.doc_id], ensure_ascii=False) + "\n").encode()
        h.update(line)
        size += len(line)
    build = json.dumps([BUILTIN_VERSION, DOMAIN_CHARS, MAX_DOC_CHARS, MIN_DOC_CHARS], sort_keys=True)
    return {"size": size, "mtime_ns": 0, "sha256": h.hexdigest(), "hashed": "full",
            "builtin_version": BUILTIN_VERSION, "python": sys.version.split()[0], "build": build}


def builtin_documents(cache_dir: str | Path | None = None, seed: int = 0,
                      max_docs_per_domain: int | None = None) -> list[Document]:
    """The built-in corpus's documents, from the cache or built (and cached): see builtin_corpus."""
    path = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), seed, max_docs_per_domain)
    docs = _read_cache(path)
    if docs is None:
        docs = build_builtin_documents(seed, max_docs_per_domain)
        header = {"moelab_builtin_corpus": BUILTIN_VERSION, "python": sys.version.split()[0], "seed": seed,
                  "max_docs_per_domain": max_docs_per_domain, "documents": len(docs)}
        body = [json.dumps(header)] + [json.dumps({"text": d.text, "domain": d.domain, "doc_id": d.doc_id},
                                                  ensure_ascii=False) for d in docs]
        try:
            write_atomic(path, "\n".join(body) + "\n")
        except OSError:
            pass
    return docs


def load_corpus(source: str | Path | None, cache_dir: str | Path | None = None, seed: int = 0,
                val_fraction: float = DEFAULT_VAL_FRACTION) -> Corpus:
    """A corpus from ``source``: None or ``"builtin"``, a text file, a directory, or a ``.jsonl`` file.

    - text file: documents separated by lines holding only ``<|endoftext|>`` if there are any, else
      by blank lines; domain ``text``.
    - directory: every text file below it (``*.txt``, ``*.md``, ``*.py`` ...; see
      :data:`moelab.data.userdata.TEXT_SUFFIXES`) is one document; its domain is the name of its
      top-level subdirectory (``data/code/a.py`` -> ``code``), or ``text`` for files directly inside.
    - ``.jsonl``: one JSON object per line with a string ``text`` and optional ``domain`` and ``id``.
    """
    if isinstance(source, str) and not source.strip():
        raise DataError("the data path is empty; give a text file, a directory, a .jsonl file or 'builtin'")
    if source is None or str(source) == "builtin":
        return builtin_corpus(cache_dir=cache_dir, seed=seed, val_fraction=val_fraction)
    path = Path(source)
    docs = read_documents(path)
    corpus = split_documents(docs, val_fraction, seed)
    if not corpus.val:
        raise DataError(
            f"{path}: holds {len(docs)} document(s), too few to hold out validation data; "
            "give at least 2 documents (separate them with blank lines in a text file, or use "
            "several files or JSONL lines)")
    return corpus
