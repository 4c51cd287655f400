"""Plain helpers shared by the test modules; the fixtures live in ``tests/conftest.py``.

Test modules import from here (``from tests.support import error_of, running_server``), never
from conftest: pytest loads conftest itself, and a helper imported from it would make a second
copy of the module. Everything here is a function or a constant:

* servers: :func:`free_port`, :func:`serve_app` / :func:`running_server` (a real uvicorn in a
  thread, with a readiness deadline), :func:`start_subprocess_server` + :func:`wait_http_ready`
  (``rag-service serve`` as a child process, for kill -9 tests), :func:`wait_ready` (a test
  client's ``/ready``);
* storage engines: :data:`ENGINES` and :func:`engine_database_url` for contract modules that run
  every test on both engines;
* responses: :func:`error_of` (the OpenAI error body, shape asserted);
* crash tests: :func:`ingest_until_killed`, :func:`code_word`, :data:`CRASH_BATCH`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from rag_service.app import create_app
from rag_service.embedding import Embedder
from rag_service.settings import Settings
from tests.pg import PgCluster

__all__ = [
    "BASE_URL",
    "CRASH_BATCH",
    "ENGINES",
    "LANE_SCORE_TOLERANCE",
    "ROOT",
    "AppFactory",
    "code_word",
    "engine_database_url",
    "error_of",
    "free_port",
    "ingest_until_killed",
    "running_server",
    "serve_app",
    "start_subprocess_server",
    "wait_http_ready",
    "wait_ready",
]

ROOT = Path(__file__).resolve().parent.parent
# Stored chunks are embedded on the bulk lane's runtime and queries on the interactive lane's,
# which may differ (rag_service.runtimes: e.g. PyTorch bf16 and ONNX Runtime fp32); the probe
# keeps their vectors at cosine >= 0.9999, and their scores for one query differ by about
# 0.002 at most on real text (0.014 is the bound the probe implies).
LANE_SCORE_TOLERANCE = 5e-3
# Test clients address the app as a loopback client does: Litestar's default base URL
# (http://testserver.local) is a Host the service refuses without RAG_API_KEY.
BASE_URL = "http://127.0.0.1"
ENGINES = ["embedded", "postgres"]
AppFactory = Callable[..., Any]


def wait_ready(client: Any, timeout: float = 120.0) -> None:
    """Poll a test client's ``/ready`` until it answers 200 (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.get("/ready")
        if resp.status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"service not ready: {resp.text}")


def engine_database_url(request: pytest.FixtureRequest) -> str | None:
    """For a fixture parametrized over :data:`ENGINES`: None (embedded) or a fresh, empty
    PostgreSQL database on the session's server."""
    if request.param == "embedded":
        return None
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_app(app: Litestar, port: int, ready_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn in a thread on loopback ``port``; yields its URL once
    ``/ready`` answers 200 (AssertionError after ``ready_timeout`` seconds)."""
    import uvicorn

    from rag_service.http_protocol import CoalescingHttpToolsProtocol

    config = uvicorn.Config(  # the protocol rag-service serve runs (header bound included)
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        http=CoalescingHttpToolsProtocol,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not become ready")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def running_server(settings: Settings, embedder: Embedder, backend: Any = None) -> Iterator[str]:
    """The service on ``settings.port`` (see :func:`serve_app`); ``backend`` as for
    :func:`~rag_service.app.create_app`. Yields its URL."""
    app = create_app(settings, embedder=embedder, backend=backend)
    with serve_app(app, settings.port) as url:
        yield url


def start_subprocess_server(data_dir: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    """``rag-service serve`` as a real child process (for kill -9 tests). Its output goes to
    ``<data_dir>.log`` (a pipe nobody reads would fill up and block the server)."""
    full_env = {
        **os.environ,
        "RAG_DATA_DIR": str(data_dir),
        "RAG_PORT": str(port),
        "RAG_LOG_LEVEL": "WARNING",
        "RAG_UPSTREAM_URL": f"http://127.0.0.1:{port}/none",
        "RAG_UPSTREAM_MODEL": "none",
        **env,
    }
    log = open(f"{data_dir}.log", "ab")  # noqa: SIM115 - the child process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "rag_service", "serve"],
        env=full_env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_http_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def error_of(resp: httpx.Response) -> dict[str, Any]:
    """The OpenAI-shaped error body of a response (asserting the shape)."""
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return dict(body["error"])


CRASH_BATCH = 8  # documents per upsert in :func:`ingest_until_killed`


def code_word(doc_id: str) -> str:
    """The word only the document ``doc_id`` of :func:`ingest_until_killed` holds."""
    return "w" + doc_id.removeprefix("doc-").replace("-", "x")


def ingest_until_killed(
    url: str,
    kill: Callable[[], None],
    acknowledged: list[str],
    *,
    at_least: int,
    settle_s: float = 0.0,
    tag: str = "",
) -> None:
    """kill -9 mid-ingest: upsert batches of :data:`CRASH_BATCH` documents into the collection
    ``crash`` from a thread, appending the ids of every acknowledged batch to ``acknowledged``;
    once it holds ``at_least`` ids (and ``settle_s`` more passed), ``kill()`` ends the server.

    Document ``j`` of batch ``b`` has id ``doc-{tag}{b}-{j}``, the metadata ``{"batch": b}``
    and a text holding :func:`code_word` of its id, so a search can find each one alone."""
    stop = threading.Event()

    def ingest() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            batch = 0
            while not stop.is_set():
                ids = [f"doc-{tag}{batch}-{j}" for j in range(CRASH_BATCH)]
                docs = [
                    {
                        "id": doc_id,
                        "text": f"Record {doc_id}: the code word is {code_word(doc_id)}.",
                        "metadata": {"batch": batch},
                    }
                    for doc_id in ids
                ]
                try:
                    resp = client.post("/v1/collections/crash/documents", json={"documents": docs})
                except httpx.HTTPError:
                    return  # the server died mid-request: not acknowledged
                if resp.status_code == 200:
                    acknowledged.extend(ids)
                batch += 1

    writer = threading.Thread(target=ingest)
    writer.start()
    try:
        deadline = time.monotonic() + 60
        while len(acknowledged) < at_least and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(settle_s)
        kill()
    finally:
        stop.set()
        writer.join(timeout=30)
