"""User corpora: a text file, a directory of text files, or JSONL. Every bad input is a DataError
that names the file (and line) and says what to do."""

from __future__ import annotations

import json
import re
from pathlib import Path

from moelab.data.document import Document
from moelab.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".tex", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs",
                 ".go", ".java", ".js", ".ts", ".html", ".css", ".json", ".yaml", ".yml", ".toml", ".cfg",
                 ".ini", ".sh", ".csv", ".tsv", ".xml")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_DOMAIN = "text"
SEPARATOR = "<|endoftext|>"


def read_text(path: Path) -> str:
    """UTF-8 text of ``path`` (a leading BOM is dropped); a DataError if it is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); check the path and its permissions") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
            f"re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
        ) from e


def split_text(text: str) -> list[str]:
    """Documents of a text file: separated by ``<|endoftext|>`` lines if any, else by blank lines."""
    if re.search(rf"^{re.escape(SEPARATOR)}\s*$", text, flags=re.M):
        parts = re.split(rf"^{re.escape(SEPARATOR)}\s*$\n?", text, flags=re.M)
    else:
        parts = re.split(r"\n[ \t\r]*\n(?:[ \t\r]*\n)*", text)
    return [p.strip("\r\n") for p in parts if p.strip()]


def read_text_file(path: Path) -> list[Document]:
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; put some text in it or point to another file")
    return [Document(text=t, domain=DEFAULT_DOMAIN, doc_id=f"{path.name}#{i}") for i, t in enumerate(split_text(text))]


def read_jsonl(path: Path) -> list[Document]:
    text = read_text(path)
    docs = []
    seen: dict[str, int] = {}  # id -> line
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one object like "
                            '{"text": "...", "domain": "..."}') from e
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}; write "
                            '{"text": "...", "domain": "..."}')
        if "text" not in rec:
            raise DataError(f"{where}: no 'text' field (keys: {', '.join(map(repr, rec)) or 'none'}); every line "
                            "needs a string 'text' (and optionally 'domain' and 'id')")
        if not isinstance(rec["text"], str):
            raise DataError(f"{where}: field 'text' is {type(rec['text']).__name__}, not a string")
        domain = rec.get("domain", DEFAULT_DOMAIN)
        if not isinstance(domain, str) or not domain.strip():
            raise DataError(f"{where}: field 'domain' must be a non-empty string, got {domain!r}")
        doc_id = str(rec.get("id", f"{path.name}:{lineno}"))
        if doc_id in seen:
            raise DataError(f"{where}: id {doc_id!r} is already used on line {seen[doc_id]}; "
                            "make every 'id' unique or leave the field out")
        seen[doc_id] = lineno
        if not rec["text"].strip():
            continue
        docs.append(Document(text=rec["text"], domain=domain.strip(), doc_id=doc_id))
    if not docs:
        raise DataError(f"{path}: holds no documents (every line is blank or has empty 'text'); "
                        'add lines like {"text": "...", "domain": "..."}')
    return docs


def text_files(root: Path) -> list[Path]:
    """The files of a directory corpus: text files below ``root``, hidden ones left out, sorted."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def read_directory(root: Path) -> list[Document]:
    files = text_files(root)
    if not files:
        raise DataError(f"{root}: the directory holds no text files (looked for {', '.join(TEXT_SUFFIXES)} "
                        "recursively); add files or point to a file")
    docs = []
    for p in files:
        rel = p.relative_to(root)
        text = read_text(p)
        if text.strip():
            domain = rel.parts[0] if len(rel.parts) > 1 else DEFAULT_DOMAIN
            docs.append(Document(text=text, domain=domain, doc_id=rel.as_posix()))
    if not docs:
        raise DataError(f"{root}: every text file in the directory is empty; add text to them")
    return docs


def read_documents(path: Path) -> list[Document]:
    """Documents of a user corpus at ``path`` (see :func:`moelab.data.corpus.load_corpus`)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; give a text file, a directory of text files, "
                        "a .jsonl file, or 'builtin' for the built-in corpus")
    if path.is_dir():
        return read_directory(path)
    if path.suffix.lower() in JSONL_SUFFIXES:
        return read_jsonl(path)
    return read_text_file(path)
