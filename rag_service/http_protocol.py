"""uvicorn's httptools protocol with the writes of one event-loop step sent as one, and a
bound on the size of a request's headers.

uvicorn writes a response's headers the moment ``http.response.start`` is sent and its body
with the next message. Two writes are two TCP segments: the client wakes for the headers,
parses them, and often runs on the very core that is about to write the body, which then
waits. Handlers here send the headers and the first body bytes in the same loop step (a JSON
answer, or a stream's first event), so buffering a step's writes and writing them together
puts both in one segment: the client wakes once, with everything it needs.

Framework internals, and what they buy. This subclasses uvicorn's httptools protocol
(``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol``, a private module), overrides its
``connection_made(transport)`` and relies on it keeping the transport it is given as
``self.transport`` for every write and on ``self.loop`` being set in ``__init__``. The header
bound overrides ``data_received(data)`` and the parser callbacks ``on_headers_complete()`` and
``on_message_complete()``, and reads ``self.config`` (the ``uvicorn.Config``, whose public
``h11_max_incomplete_event_size`` carries the bound, as it does for uvicorn's h11 protocol). None of
that is uvicorn's API: ``pyproject.toml`` pins the minor version this was written against
(uvicorn 0.54) and ``tests/test_internals.py`` fails, naming this module, when any of it
changes. Measured gain (benchmarks/bench_chat.py C1, A/B on the 2-core CPU machine): a chat
stream's time to first byte through the service, as a ratio of the fake upstream's direct
one, went from 1.18 to 1.14 at the median. If an upgrade breaks it, serving with uvicorn's
own ``http="httptools"`` (``rag_service/cli/main.py``) gives up only that.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["DEFAULT_MAX_HEADER_BYTES", "CoalescingHttpToolsProtocol"]

DEFAULT_MAX_HEADER_BYTES = 64 * 1024


class _StepBufferedTransport:
    """Forwards to the real transport, except that writes made in one loop step are joined
    and written at the end of the step (``call_soon``). Closing writes what is buffered."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    # asyncio's signature (uvicorn narrows it to Transport). Transports are duck-typed here as
    # in uvicorn: uvloop's is no asyncio.Transport subclass, and neither is the wrapper.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        buffered = _StepBufferedTransport(cast(asyncio.Transport, transport), self.loop)
        limit = self.config.h11_max_incomplete_event_size
        self._header_limit = limit if limit is not None else DEFAULT_MAX_HEADER_BYTES
        self._headers_pending = True  # the next bytes are a request line and headers
        self._header_bytes = 0
        self._tail = b""
        super().connection_made(cast(asyncio.Transport, buffered))

    # ---- header size ---------------------------------------------------------------------
    # httptools buffers a header until it ends (a 10 MB Authorization header was read whole,
    # then answered 401); h11 has uvicorn's h11_max_incomplete_event_size for this, httptools
    # nothing. The same option bounds the bytes of a request line and headers here: past it,
    # 431 before the parser is fed them.
    def data_received(self, data: bytes) -> None:
        if self._headers_pending:
            room = self._header_limit - self._header_bytes
            if len(data) > room and b"\r\n\r\n" not in self._tail + data[: max(room, 0) + 4]:
                self._refuse_headers()
                return
            self._header_bytes += len(data)
            self._tail = data[-3:]
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._headers_pending = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._headers_pending = True
        self._header_bytes = 0
        self._tail = b""

    def _refuse_headers(self) -> None:
        message = (
            f"the request line and headers are larger than {self._header_limit} bytes "
            "(RAG_MAX_HEADER_BYTES)"
        )
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "headers_too_large",
                }
            }
        ).encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()
        self._headers_pending = False  # nothing more is read from this connection
