"""The served HTTP protocol: a response's headers and first body bytes leave as one write."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from litestar import Litestar, get
from litestar.response import Stream

from rag_service.http_protocol import _StepBufferedTransport
from tests.support import ROOT, free_port


class _Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name, default=None):  # type: ignore[override]
        return ("127.0.0.1", 1) if name == "peername" else default


def test_writes_of_one_loop_step_are_joined():
    async def run() -> _Recorder:
        real = _Recorder()
        t = _StepBufferedTransport(real, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(memoryview(b"first"))
        assert real.writes == []  # nothing before the step ends
        await asyncio.sleep(0)
        t.write(b"second")
        await asyncio.sleep(0)
        t.write(b"last")
        t.close()  # flushes first
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else forwards
        return real

    real = asyncio.run(run())
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nfirst", b"second", b"last"]
    assert real.closed


def test_nothing_is_written_to_a_closing_transport():
    async def run() -> _Recorder:
        real = _Recorder()
        t = _StepBufferedTransport(real, asyncio.get_running_loop())
        t.write(b"late")
        real.closed = True  # the client went away within the step
        await asyncio.sleep(0)
        return real

    assert asyncio.run(run()).writes == []


async def _events():
    yield b"data: first\n\n"
    await asyncio.sleep(0.2)
    yield b"data: later\n\n"


@get("/json", sync_to_thread=False)
def _as_json() -> dict[str, str]:
    return {"answer": "forty-two"}


@get("/sse")
async def _sse() -> Stream:
    from rag_service.streaming import EventStream

    return EventStream(_events(), headers={})


app = Litestar([_as_json, _sse])  # served by a child process below


@contextmanager
def _serve(protocol: str) -> Iterator[int]:
    """This module's app in a child process (a server thread here would hold the GIL between
    its two writes, and the client could never see them apart)."""
    port = free_port()
    code = (
        "import uvicorn; uvicorn.run('tests.test_http_protocol:app', host='127.0.0.1', "
        f"port={port}, http={protocol!r}, log_level='warning')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _first_segment(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return s.recv(65536)


def test_headers_and_first_body_bytes_arrive_together():
    with _serve("rag_service.http_protocol:CoalescingHttpToolsProtocol") as port:
        for _ in range(20):  # each first recv holds headers and body: they were one write
            first = _first_segment(port, "/json")
            assert first.startswith(b"HTTP/1.1 200"), first
            assert first.endswith(b'{"answer":"forty-two"}'), first
            first = _first_segment(port, "/sse")
            assert first.startswith(b"HTTP/1.1 200") and b"data: first" in first, first
            assert b"data: later" not in first


def _send_raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        with contextlib.suppress(OSError):  # the server answers and closes while we send
            s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and (b"forty-two" in out or b"431" in out[:20]):
                break
        return out


def test_oversized_request_headers_are_refused_before_they_are_read():
    """A 10 MB Authorization header used to be read whole and then answered 401: now 431 at
    64 KiB (RAG_MAX_HEADER_BYTES), the connection closed. Requests under the bound, pipelined
    ones and ones with large bodies included, are served as before."""
    with _serve("rag_service.http_protocol:CoalescingHttpToolsProtocol") as port:
        huge = b"GET /json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"k" * 10_000_000
        answer = _send_raw(port, huge + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
        assert b"RAG_MAX_HEADER_BYTES" in answer
        fine = b"GET /json HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 60_000 + b"\r\n\r\n"
        assert _send_raw(port, fine).startswith(b"HTTP/1.1 200")
        two = b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n" * 2
        assert _send_raw(port, two).count(b"forty-two") >= 1
