"""Files to documents for ``rag-service ingest``: .txt .md .rst .html .htm .jsonl.

Ids come from paths relative to the folder given (prefixed with its name), so re-ingesting the
same tree updates documents instead of duplicating them. A .jsonl file holds one document per
line: ``{"text": ..., "id"?: ..., "metadata"?: {...}}``; lines without an id get
``<path>#<line>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SUFFIXES", "LoadError", "SourceDocument", "discover", "load"]

SUFFIXES = (".txt", ".md", ".rst", ".html", ".htm", ".jsonl")


class LoadError(ValueError):
    """A file could not be turned into documents; the message names file and line."""


@dataclass(slots=True)
class SourceDocument:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def discover(paths: list[Path]) -> Iterator[tuple[Path, str]]:
    """(file, id prefix) for every supported file under ``paths``, in a stable order."""
    for root in paths:
        if root.is_dir():
            base = root.resolve()
            for path in sorted(base.rglob("*")):
                if path.is_file() and path.suffix.lower() in SUFFIXES:
                    yield path, f"{base.name}/{path.relative_to(base).as_posix()}"
        elif root.is_file():
            yield root, root.name
        else:
            raise LoadError(f"{root}: no such file or directory")


def _html_text(raw: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(raw, "html.parser")
    for tag in soup(["script", "style", "noscript"]):
        tag.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return "\n".join(line for line in lines if line)


def load(path: Path, doc_id: str) -> list[SourceDocument]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LoadError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    suffix = path.suffix.lower()
    meta = {"source": doc_id}
    if suffix == ".jsonl":
        return list(_jsonl(raw, path, doc_id))
    text = _html_text(raw) if suffix in (".html", ".htm") else raw
    return [SourceDocument(doc_id, text, meta)] if text.strip() else []


def _jsonl(raw: str, path: Path, doc_id: str) -> Iterator[SourceDocument]:
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise LoadError(f"{path}:{lineno}: not JSON ({exc})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise LoadError(f"{path}:{lineno}: expected an object with a string 'text'")
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise LoadError(f"{path}:{lineno}: 'metadata' must be an object")
        if obj["text"].strip():
            yield SourceDocument(
                str(obj.get("id") or f"{doc_id}#{lineno}"),
                obj["text"],
                {"source": doc_id, **metadata},
            )
