"""The unit every corpus, reader and evaluation shares: one document's text, domain and id."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    doc_id: str
