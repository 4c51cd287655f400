"""The one rule for document ids, for every way a document comes in.

JSON upserts (:class:`rag_service.schemas.DocumentIn`), JSONL and file uploads
(:mod:`rag_service.uploads`), known questions and evaluation rows (their ``document_id``),
and ``rag-service ingest`` (before anything is sent) all check ids with this module, and
``rag-service check-ids`` lists stored ids that break it. An id is

* 1 to :data:`MAX_ID_CHARS` characters, none of them a control character (C0, DEL, C1);
* ``/``-separated segments, none of them empty, ``.`` or ``..``: no leading or trailing
  ``/``, no ``//``. Ids are addressed in URL paths, where clients and browsers drop empty
  segments and resolve dot segments before the request is sent, so ``a/../b`` would read,
  replace or delete the document ``b``.

Patterns here end with ``\\Z``, never ``$``: Python's ``$`` also matches before a final
newline, so ``"id\\n"`` would pass. msgspec checks ``pattern`` with ``re.search``, which is why
:data:`DOC_ID_PATTERN` is anchored at both ends.
"""

from __future__ import annotations

import re

__all__ = ["DOC_ID_PATTERN", "MAX_ID_CHARS", "RULE", "id_problem"]

RULE = (
    "ids are 1-512 characters, no control characters, '/'-separated segments that are not "
    "empty, '.' or '..'"
)

MAX_ID_CHARS = 512
_CONTROL = r"\x00-\x1f\x7f-\x9f"
DOC_ID_PATTERN = r"\A(?!/)(?!.*//)(?!(?:.*/)?\.\.?(?:/|\Z))(?!.*/\Z)" + f"[^{_CONTROL}]+" + r"\Z"
_RULE = re.compile(DOC_ID_PATTERN, re.DOTALL)
_CONTROL_CHAR = re.compile(f"[{_CONTROL}]")


def id_problem(doc_id: str) -> str | None:
    """Why ``doc_id`` cannot be a document id (one short phrase), or None when it can."""
    if not doc_id:
        return "it is empty"
    if len(doc_id) > MAX_ID_CHARS:
        return f"it is {len(doc_id)} characters long; the limit is {MAX_ID_CHARS}"
    if (found := _CONTROL_CHAR.search(doc_id)) is not None:
        return f"it holds a control character (U+{ord(found.group()):04X})"
    if doc_id.startswith("/") or doc_id.endswith("/"):
        return "it starts or ends with '/'"
    segments = doc_id.split("/")
    if "" in segments:
        return "it holds an empty segment ('//')"
    if "." in segments or ".." in segments:
        return "it holds a '.' or '..' segment (clients resolve those in URL paths)"
    if _RULE.search(doc_id) is None:  # the pattern and the checks above say the same
        return "it breaks the document id rule"
    return None
