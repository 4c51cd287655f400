"""JSON request bodies: decoded and bounded in one place, for every route.

Every JSON body goes through :func:`decode_body` before any handler sees it:

* it must be UTF-8 and valid JSON (else 400 naming the byte offset msgspec reports);
* containers nest at most :data:`MAX_DEPTH` deep (a 1,000-deep array would otherwise overflow
  the decoder's or a later serializer's recursion and end in a 500);
* every integer fits in 64 bits (SQLite, FAISS ids, torch seeds and upstream servers all stop
  there; a larger one would fail deep inside one of them).

:class:`BoundedRequest` is the app's request class: its ``json()`` applies :func:`decode_body`
and then converts the body to the handler's ``data`` type *strictly* (``"5"`` is not an int,
``0`` is not a bool, as in the OpenAI API), so a bad field is a 400 naming it, and hands
Litestar the converted struct, which its signature model passes through as it is (the body is
decoded once and converted once). :meth:`BoundedRequest.plain_json` gives the decoded value
before conversion: the chat route forwards the fields this service does not know upstream.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.types import Empty

from rag_service.errors import InvalidRequest

__all__ = ["MAX_DEPTH", "BoundedRequest", "decode_body", "validate"]

MAX_DEPTH = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

T = TypeVar("T")
_PATH = re.compile(r"at `\$\.?(.*)`$")
_FIELD = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]*)`")


def _path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _check_bounds(value: Any) -> None:
    """Iterative walk (no recursion to overflow): depth and 64-bit integers."""
    stack: list[tuple[Any, int, list[str | int]]] = [(value, 0, [])]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, dict):
            if depth >= MAX_DEPTH:
                raise InvalidRequest(
                    f"JSON nests deeper than {MAX_DEPTH} levels", param=_path(where) or None
                )
            stack.extend((v, depth + 1, [*where, str(k)]) for k, v in node.items())
        elif isinstance(node, list):
            if depth >= MAX_DEPTH:
                raise InvalidRequest(
                    f"JSON nests deeper than {MAX_DEPTH} levels", param=_path(where) or None
                )
            stack.extend((v, depth + 1, [*where, i]) for i, v in enumerate(node))
        elif type(node) is int and not INT64_MIN <= node <= INT64_MAX:
            raise InvalidRequest("integer is outside the 64-bit range", param=_path(where) or None)


def decode_body(raw: bytes) -> Any:
    """The decoded JSON body; :class:`InvalidRequest` for anything malformed or unbounded."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"Request body is not valid UTF-8 (byte {exc.start}): {exc.reason}"
        ) from exc
    except RecursionError as exc:
        raise InvalidRequest(f"JSON nests deeper than {MAX_DEPTH} levels") from exc
    _check_bounds(value)
    return value


def validate(value: Any, target: type[T]) -> T:
    """``value`` converted strictly to ``target``; the error names the offending field."""
    try:
        return msgspec.convert(value, target, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH.search(message)
        param = match.group(1) if match else ""
        named = _FIELD.search(message)  # a missing or unknown field: name the field itself
        if named is not None:
            param = f"{param}.{named.group(1)}" if param else named.group(1)
        raise InvalidRequest(message, param=param or None) from exc


class BoundedRequest(Request[Any, Any, Any]):
    """The request class of the app: bounded JSON decoding and strict body validation."""

    async def plain_json(self) -> Any:
        """The body as decoded (bounded), before conversion to the handler's type."""
        plain = self.scope.get("rag.plain_json", Empty)  # type: ignore[typeddict-item]
        if plain is Empty:
            plain = decode_body(await self.body() or b"null")
            self.scope["rag.plain_json"] = plain  # type: ignore[typeddict-unknown-key]
        return plain

    async def json(self) -> Any:
        """The body converted strictly to the handler's ``data`` struct (the value itself
        for a handler without one)."""
        if self._json is Empty:
            cached = self._connection_state.json
            if cached is not Empty:
                self._json = cached
            else:
                value = await self.plain_json()
                field = self.route_handler.parsed_data_field
                target = field.annotation if field is not None else None
                if isinstance(target, type) and issubclass(target, msgspec.Struct):
                    value = validate(value, target)
                self._json = self._connection_state.json = value
        return self._json
