"""The framework internals two modules rely on, checked by name and by effect.

rag_service/http_protocol.py extends uvicorn's private httptools protocol and
rag_service/streaming.py copies Litestar's ``Stream.to_asgi_response`` and extends its
streaming response. Both are pinned to the minor version they were written against
(pyproject.toml); when an upgrade changes what they rely on, these tests fail with a message
naming the module to revisit, before the change can misbehave in a served response.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

from litestar.response import Stream
from litestar.response.streaming import ASGIStreamingResponse

from rag_service.http_protocol import CoalescingHttpToolsProtocol, _StepBufferedTransport
from rag_service.streaming import EventStream, _FirstEventFirst

UVICORN = (
    "rag_service/http_protocol.py extends uvicorn's private httptools protocol: revisit it (or "
    "serve with uvicorn's own http='httptools') before moving the uvicorn pin in pyproject.toml"
)
LITESTAR = (
    "rag_service/streaming.py copies and extends Litestar's streaming response: revisit it (or "
    "return a plain Stream from the chat controller) before moving the litestar pin in "
    "pyproject.toml"
)


def _params(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


# ---- uvicorn --------------------------------------------------------------------------------
def test_uvicorn_httptools_protocol_has_what_http_protocol_overrides():
    module = importlib.import_module("uvicorn.protocols.http.httptools_impl")
    base = getattr(module, "HttpToolsProtocol", None)
    assert base is not None, f"uvicorn has no httptools_impl.HttpToolsProtocol. {UVICORN}"
    assert CoalescingHttpToolsProtocol.__bases__ == (base,), UVICORN
    assert [n for n, _, _ in _params(base.connection_made)] == ["self", "transport"], (
        f"HttpToolsProtocol.connection_made is now {inspect.signature(base.connection_made)}. "
        f"{UVICORN}"
    )
    init = [n for n, _, _ in _params(base.__init__)]
    assert init[:4] == ["self", "config", "server_state", "app_state"], (
        f"HttpToolsProtocol.__init__ is now {inspect.signature(base.__init__)}. {UVICORN}"
    )


class _Wire(asyncio.Transport):
    """The socket side: records each write the protocol makes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that sends the headers and the body in one loop step, as ours do."""
    headers = [(b"content-length", b"9")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"forty-two"})


def test_uvicorn_writes_through_the_transport_it_was_given():
    """The protocol keeps the wrapped transport (``self.transport``) and the loop
    (``self.loop``), and writes the response through it: headers and body in one write."""
    import uvicorn
    from uvicorn.server import ServerState

    async def run() -> tuple[Any, _Wire]:
        config = uvicorn.Config(_answer, lifespan="off", log_level="warning")
        config.load()
        protocol = CoalescingHttpToolsProtocol(
            config=config, server_state=ServerState(), app_state={}
        )
        wire = _Wire()
        protocol.connection_made(wire)
        assert protocol.loop is asyncio.get_running_loop(), f"no self.loop. {UVICORN}"
        transport = protocol.transport
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(200):
            await asyncio.sleep(0.005)
            if wire.writes:
                break
        await asyncio.sleep(0.02)
        protocol.connection_lost(None)
        return transport, wire

    transport, wire = asyncio.run(run())
    assert isinstance(transport, _StepBufferedTransport), (
        f"HttpToolsProtocol no longer keeps the transport it is given. {UVICORN}"
    )
    assert len(wire.writes) == 1, f"{len(wire.writes)} writes: {wire.writes!r}. {UVICORN}"
    assert wire.writes[0].startswith(b"HTTP/1.1 200"), wire.writes
    assert wire.writes[0].endswith(b"forty-two"), wire.writes


def test_uvicorn_httptools_protocol_has_what_the_header_bound_overrides():
    module = importlib.import_module("uvicorn.protocols.http.httptools_impl")
    base = module.HttpToolsProtocol
    for name, params in (
        ("data_received", ["self", "data"]),
        ("on_headers_complete", ["self"]),
        ("on_message_complete", ["self"]),
    ):
        method = getattr(base, name, None)
        assert method is not None, f"HttpToolsProtocol has no {name}. {UVICORN}"
        assert [n for n, _, _ in _params(method)] == params, (
            f"HttpToolsProtocol.{name} is now {inspect.signature(method)}. {UVICORN}"
        )
    config = inspect.signature(importlib.import_module("uvicorn").Config.__init__).parameters
    assert "h11_max_incomplete_event_size" in config, (
        f"uvicorn.Config has no h11_max_incomplete_event_size (the header bound). {UVICORN}"
    )


def test_uvicorn_headers_past_the_bound_are_answered_431():
    """By effect: headers past ``h11_max_incomplete_event_size`` get a 431 and the connection
    closes; a request with a body larger than the bound is served."""
    import uvicorn
    from uvicorn.server import ServerState

    async def run(request: bytes) -> _Wire:
        config = uvicorn.Config(
            _answer, lifespan="off", log_level="warning", h11_max_incomplete_event_size=1024
        )
        config.load()
        protocol = CoalescingHttpToolsProtocol(
            config=config, server_state=ServerState(), app_state={}
        )
        wire = _Wire()
        protocol.connection_made(wire)
        for start in range(0, len(request), 700):  # arrives in pieces
            protocol.data_received(request[start : start + 700])
            if wire.closed:
                break
        for _ in range(100):
            await asyncio.sleep(0.005)
            if wire.writes:
                break
        await asyncio.sleep(0.02)
        protocol.connection_lost(None)
        return wire

    big = asyncio.run(run(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n"))
    assert big.writes and big.writes[0].startswith(b"HTTP/1.1 431"), big.writes
    assert big.closed, f"the connection stays open. {UVICORN}"
    body = b"x" * 5000
    ok = asyncio.run(run(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + body))
    assert ok.writes and ok.writes[0].startswith(b"HTTP/1.1 200"), ok.writes


# ---- Litestar -------------------------------------------------------------------------------
def test_litestar_stream_to_asgi_response_is_what_streaming_copies():
    theirs, ours = Stream.to_asgi_response, EventStream.to_asgi_response
    assert _params(ours) == _params(theirs), (
        f"Stream.to_asgi_response is now {inspect.signature(theirs)}, EventStream's is "
        f"{inspect.signature(ours)}. {LITESTAR}"
    )


def test_litestar_streaming_response_has_what_streaming_extends():
    init = {n for n, _, _ in _params(ASGIStreamingResponse.__init__)}
    passed = {
        "iterator",
        "background",
        "content_length",
        "cookies",
        "encoded_headers",
        "encoding",
        "headers",
        "is_head_response",
        "media_type",
        "status_code",
    }
    assert passed <= init, (
        f"ASGIStreamingResponse.__init__ no longer takes {sorted(passed - init)}. {LITESTAR}"
    )
    send_body = ASGIStreamingResponse.send_body
    assert [n for n, _, _ in _params(send_body)] == ["self", "send", "receive"], (
        f"ASGIStreamingResponse.send_body is now {inspect.signature(send_body)}. {LITESTAR}"
    )
    assert "iterator" in getattr(ASGIStreamingResponse, "__slots__", ()), (
        f"ASGIStreamingResponse keeps no 'iterator' attribute. {LITESTAR}"
    )


def test_litestar_streams_the_iterator_streaming_leaves_it():
    """``send_body`` streams ``self.iterator`` as it is when called: every event once, in
    order, the first one written before the rest."""
    sent: list[bytes] = []

    async def events():
        for event in (b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"):
            yield event

    async def run() -> None:
        done = asyncio.Event()

        async def receive() -> Any:
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(message["body"])
            if not message["more_body"]:
                done.set()

        response = _FirstEventFirst(iterator=events(), content_length=0)
        await asyncio.wait_for(response.send_body(send, receive), 10)

    asyncio.run(run())
    assert sent == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n", b""], (
        f"the stream sent {sent!r}. {LITESTAR}"
    )
