"""JSON request bodies: decoded and bounded in one place, for every route.

Every JSON body goes through :func:`decode_body` before any handler sees it: UTF-8, valid
JSON, at most :data:`MAX_DEPTH` levels deep and 64-bit integers, the bounds of
:mod:`rag_service.bounded_json` that every JSON the service parses is held to (else a 400
naming the byte offset or the field).

:class:`BoundedRequest` is the app's request class: its ``json()`` applies :func:`decode_body`
and then converts the body to the handler's ``data`` type *strictly* (``"5"`` is not an int,
``0`` is not a bool, as in the OpenAI API), so a bad field is a 400 naming it, and hands
Litestar the converted struct, which its signature model passes through as it is (the body is
decoded once and converted once). A body sent with another ``Content-Type`` than JSON is a 415
before it is read as JSON (:func:`require_json`). :meth:`BoundedRequest.plain_json` gives the
decoded value before conversion: the chat route forwards the fields this service does not
know upstream.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.types import Empty

from rag_service.bounded_json import MAX_DEPTH, JsonBoundsError, loads
from rag_service.errors import InvalidRequest, UnsupportedMediaType

__all__ = ["MAX_DEPTH", "BoundedRequest", "decode_body", "require_json", "validate"]

T = TypeVar("T")
_PATH = re.compile(r"at `\$\.?(.*)`\Z")
_FIELD = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]*)`")


def decode_body(raw: bytes) -> Any:
    """The decoded JSON body; :class:`InvalidRequest` for anything malformed or unbounded."""
    try:
        return loads(raw)
    except JsonBoundsError as exc:
        if exc.syntax:
            raise InvalidRequest(f"Request body is not valid JSON: {exc.reason}") from exc
        raise InvalidRequest(exc.reason, param=exc.path) from exc


def require_json(content_type: str | None) -> None:
    """:class:`UnsupportedMediaType` (415) unless ``content_type`` is JSON
    (``application/json`` or ``application/*+json``, any parameters): a cross-site form or
    "simple" request cannot send one without a CORS preflight."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise UnsupportedMediaType(
        f"the body must be sent as Content-Type: application/json, not {media or 'none'!r}",
        param=None,
    )


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
            raw = await self.body()
            if raw:
                require_json(self.headers.get("content-type"))
            plain = decode_body(raw or b"null")
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
