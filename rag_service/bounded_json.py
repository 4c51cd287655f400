"""JSON decoded with the service's bounds, wherever it comes from.

Request bodies (:mod:`rag_service.request_body`), the ``metadata`` part of a file upload,
the lines of a JSONL upload (:mod:`rag_service.loaders`) and the JSONL files the commands
read (:mod:`rag_service.jsonl`) all decode with :func:`loads`:

* valid JSON in UTF-8 (msgspec's decoder, which reports the byte offset);
* containers nest at most :data:`MAX_DEPTH` deep (the standard library's decoder overflows
  Python's recursion on ``"[" * 100000``, and deep values overflow later serialisers);
* every integer fits in 64 bits (SQLite, FAISS ids, torch seeds and upstream servers all stop
  there).

The bounds are checked by an iterative walk, so no input can overflow the stack.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["INT64_MAX", "INT64_MIN", "MAX_DEPTH", "JsonBoundsError", "check_bounds", "loads"]

MAX_DEPTH = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class JsonBoundsError(ValueError):
    """Not JSON, or JSON past a bound. ``syntax``: the input is not JSON at all (the reason
    is the decoder's); ``path`` is where a bound was passed (``a.b[2]``), when known."""

    def __init__(self, reason: str, path: str | None = None, *, syntax: bool = False) -> None:
        if syntax:
            text = f"not JSON ({reason})"
        else:
            text = reason if path is None else f"{reason} (at {path})"
        super().__init__(text)
        self.reason = reason
        self.path = path
        self.syntax = syntax


def _path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def check_bounds(value: Any) -> None:
    """:class:`JsonBoundsError` when ``value`` nests deeper than :data:`MAX_DEPTH` or holds an
    integer outside 64 bits."""
    stack: list[tuple[Any, int, list[str | int]]] = [(value, 0, [])]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, dict | list):
            if depth >= MAX_DEPTH:
                raise JsonBoundsError(
                    f"JSON nests deeper than {MAX_DEPTH} levels", _path(where) or None
                )
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend(
                (v, depth + 1, [*where, k if isinstance(k, int) else str(k)]) for k, v in items
            )
        elif type(node) is int and not INT64_MIN <= node <= INT64_MAX:
            raise JsonBoundsError("integer is outside the 64-bit range", _path(where) or None)


def loads(raw: bytes | str) -> Any:
    """The value ``raw`` holds; :class:`JsonBoundsError` (a ValueError) saying why not."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise JsonBoundsError(str(exc), syntax=True) from exc
    except UnicodeDecodeError as exc:
        raise JsonBoundsError(f"not UTF-8 (byte {exc.start}): {exc.reason}", syntax=True) from exc
    except RecursionError as exc:
        raise JsonBoundsError(f"JSON nests deeper than {MAX_DEPTH} levels") from exc
    check_bounds(value)
    return value
