"""Where a chunk sits in its document: page and section, for citations.

A document's layout is part of its metadata, so it travels with the document through every
engine, reindex and replica without a column of its own:

``page_starts``
    the character offset in the text where each page begins (``[0, 1830, ...]``: page 1
    starts at 0). The PDF loader writes it; any client may send it with a text.
``sections``
    ``[[offset, heading], ...]``: where each section heading begins, in order. The Markdown,
    reST, HTML and Word loaders write it.

A chunk keeps the character span it covers (``start``/``end``), so its page, the page it
ends on when it crosses a page break, and the section it starts in follow by bisection at
read time. Search results and chat sources carry them as ``page``, ``page_end`` and
``section``; their ``metadata`` leaves the two layout lists out (a 300-page PDF would repeat
300 offsets in every result). The whole document (GET .../documents/{id}) keeps them.
"""

from __future__ import annotations

import bisect
from typing import Any

from rag_service.errors import InvalidRequest

__all__ = ["LAYOUT_KEYS", "check_layout", "locate", "without_layout"]

PAGE_STARTS = "page_starts"
SECTIONS = "sections"
LAYOUT_KEYS = (PAGE_STARTS, SECTIONS)
MAX_HEADING_CHARS = 300
# Pages or sections of one document (the rest of the metadata has its own 64 KiB bound).
MAX_LAYOUT_ENTRIES = 100_000


def check_layout(metadata: dict[str, Any], text_length: int, param: str) -> None:
    """:class:`InvalidRequest` naming ``param.<key>`` unless the layout keys (when present)
    are ascending offsets inside the text (and section headings are short strings)."""
    starts = metadata.get(PAGE_STARTS)
    if starts is not None:
        where = f"{param}.{PAGE_STARTS}"
        if not isinstance(starts, list) or not 0 < len(starts) <= MAX_LAYOUT_ENTRIES:
            raise InvalidRequest(
                f"page_starts must be a list of 1-{MAX_LAYOUT_ENTRIES} offsets", param=where
            )
        previous = -1
        for offset in starts:
            if not _offset(offset, text_length) or offset < previous:
                raise InvalidRequest(
                    "page_starts must be non-decreasing character offsets into the text "
                    f"(0 to {text_length}); got {offset!r}",
                    param=where,
                )
            previous = offset
    sections = metadata.get(SECTIONS)
    if sections is not None:
        where = f"{param}.{SECTIONS}"
        if not isinstance(sections, list) or len(sections) > MAX_LAYOUT_ENTRIES:
            raise InvalidRequest(
                f"sections must be a list of at most {MAX_LAYOUT_ENTRIES} [offset, heading] pairs",
                param=where,
            )
        previous = -1
        for entry in sections:
            ok = (
                isinstance(entry, list)
                and len(entry) == 2
                and _offset(entry[0], text_length)
                and entry[0] >= previous
                and isinstance(entry[1], str)
                and 0 < len(entry[1]) <= MAX_HEADING_CHARS
            )
            if not ok:
                raise InvalidRequest(
                    "sections must be [offset, heading] pairs with non-decreasing offsets into "
                    f"the text and headings of 1-{MAX_HEADING_CHARS} characters; got "
                    f"{str(entry)[:80]}",
                    param=where,
                )
            previous = entry[0]


def _offset(value: Any, text_length: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= text_length


def locate(metadata: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """``page`` (1-based), ``page_end`` (only when the span ends on a later page) and
    ``section`` of the span ``[start, end)``, each only when the document's layout says."""
    out: dict[str, Any] = {}
    starts = metadata.get(PAGE_STARTS)
    if isinstance(starts, list) and starts and all(isinstance(s, int) for s in starts):
        first = max(1, bisect.bisect_right(starts, start))
        last = max(first, bisect.bisect_right(starts, max(start, end - 1)))
        out["page"] = first
        if last != first:
            out["page_end"] = last
    sections = metadata.get(SECTIONS)
    if isinstance(sections, list) and sections:
        try:
            offsets = [int(s[0]) for s in sections]
            i = bisect.bisect_right(offsets, start) - 1
            if i < 0 and offsets[0] < end:
                i = 0  # the chunk starts before the first heading and reaches it
            if i >= 0:
                out["section"] = str(sections[i][1])
        except (TypeError, ValueError, IndexError):
            pass  # a layout written by hand that does not parse: no section
    return out


def without_layout(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` without the layout lists (``metadata`` itself when it has none)."""
    if not any(k in metadata for k in LAYOUT_KEYS):
        return metadata
    return {k: v for k, v in metadata.items() if k not in LAYOUT_KEYS}
