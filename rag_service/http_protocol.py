"""uvicorn's httptools protocol with the writes of one event-loop step sent as one.

uvicorn writes a response's headers the moment ``http.response.start`` is sent and its body
with the next message. Two writes are two TCP segments: the client wakes for the headers,
parses them, and often runs on the very core that is about to write the body, which then
waits. Handlers here send the headers and the first body bytes in the same loop step (a JSON
answer, or a stream's first event), so buffering a step's writes and writing them together
puts both in one segment: the client wakes once, with everything it needs.

Framework internals, and what they buy. This subclasses uvicorn's httptools protocol
(``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol``, a private module), overrides its
``connection_made(transport)`` and relies on it keeping the transport it is given as
``self.transport`` for every write and on ``self.loop`` being set in ``__init__``. None of
that is uvicorn's API: ``pyproject.toml`` pins the minor version this was written against
(uvicorn 0.54) and ``tests/test_internals.py`` fails, naming this module, when any of it
changes. Measured gain (benchmarks/bench_chat.py C1, A/B on the 2-core CPU machine): a chat
stream's time to first byte through the service, as a ratio of the fake upstream's direct
one, went from 1.18 to 1.14 at the median. If an upgrade breaks it, serving with uvicorn's
own ``http="httptools"`` (``rag_service/cli/main.py``) gives up only that.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttpToolsProtocol"]


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
        super().connection_made(cast(asyncio.Transport, buffered))
