"""JSON Lines files read the one way every command does: line numbers for messages, blank
lines skipped, a line that is not JSON (or nests past the bounds of
:mod:`rag_service.bounded_json`) reported (not fatal) so a command can list every bad line at
once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rag_service.bounded_json import JsonBoundsError, loads

__all__ = ["json_lines"]


def json_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, value, None)`` for each non-blank line that parses, ``(line number,
    None, why)`` for one that does not. The file is read whole first, so a file that cannot
    be read or is not UTF-8 raises (OSError, UnicodeDecodeError) before anything is yielded."""
    text = path.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, loads(line), None
        except JsonBoundsError as exc:
            yield number, None, str(exc)
