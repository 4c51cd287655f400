"""Shared fixtures: one real embedding model per session, apps on temporary data dirs.

Only fixtures and hooks live here; the plain helpers the test modules import are in
``tests/support.py``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from rag_service.app import create_app
from rag_service.embedding import Embedder
from rag_service.loader_workers import LoaderPool
from rag_service.settings import Settings
from tests.fake_upstream import FakeUpstream, serve_fake
from tests.pg import pg_cluster, pg_url  # noqa: F401  (fixtures)
from tests.support import BASE_URL, AppFactory, free_port, wait_ready

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("httpx").setLevel(logging.WARNING)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One model cache (RAG_CACHE_DIR) for the whole session, child processes included: each
    model's ONNX graph is exported once per session, and nothing is written to ~/.cache."""
    path = tmp_path_factory.mktemp("model-cache")
    previous = os.environ.get("RAG_CACHE_DIR")
    os.environ["RAG_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("RAG_CACHE_DIR", None)
    else:
        os.environ["RAG_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def embedder(model_cache: Path) -> Embedder:
    """The bundled model on the default runtime (ONNX Runtime on CPU)."""
    return Embedder(Settings().embedding_model_path, device="cpu")


@pytest.fixture(scope="session")
def loader_pool() -> Iterator[LoaderPool]:
    """One pool of file-loader processes for every app ``make_client`` builds (they start
    on the first upload)."""
    pool = LoaderPool.from_settings(Settings())
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def bundled_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted once per test session (about 25 s)."""
    from rag_service.model_cache import materialize_bundled_model

    return materialize_bundled_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeUpstream]:
    with serve_fake(free_port()) as fake:
        yield fake


@pytest.fixture
def fake_upstream(fake_server: FakeUpstream) -> FakeUpstream:
    fake_server.reset()
    return fake_server


@pytest.fixture
def database_url() -> str | None:
    """The storage engine of ``make_client``: None = embedded. Contract test modules override
    this with :func:`tests.support.engine_database_url` to run every test on both engines."""
    return None


@pytest.fixture
def make_client(
    tmp_path: Path,
    embedder: Embedder,
    fake_server: FakeUpstream,
    database_url: str | None,
    loader_pool: LoaderPool,
) -> Iterator[AppFactory]:
    """``make_client(**settings)`` -> a ready TestClient; closed at teardown. Chat goes to the
    fake upstream unless the settings or ``backend=`` say otherwise; storage is the engine the
    ``database_url`` fixture names."""
    opened: list[TestClient[Litestar]] = []

    def factory(
        data_dir: Path | None = None, backend: Any = None, **overrides: Any
    ) -> TestClient[Litestar]:
        overrides.setdefault("upstream_url", fake_server.url)
        overrides.setdefault("database_url", database_url)
        settings = Settings(data_dir=data_dir or tmp_path / "data", **overrides)
        loaders = None if _loader_settings(overrides) else loader_pool
        client = TestClient(
            create_app(settings, embedder=embedder, backend=backend, loaders=loaders),
            base_url=BASE_URL,
        )
        client.__enter__()
        opened.append(client)
        wait_ready(client)
        return client

    yield factory
    for client in reversed(opened):
        client.__exit__(None, None, None)


def _loader_settings(overrides: dict[str, Any]) -> bool:
    """Whether a test sets what the shared loader pool was built without."""
    names = {"loader_workers", "loader_timeout_s", "loader_memory_mb", "max_unzipped_bytes"}
    names |= {"max_zip_entries", "max_document_elements", "max_html_depth"}
    return bool(names & set(overrides))


@pytest.fixture
def client(make_client: AppFactory) -> TestClient[Litestar]:
    return make_client()
