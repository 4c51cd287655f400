"""A real PostgreSQL 16 with pgvector for tests, started by the ``pgserver`` package.

Fixtures (import them into a test module, or into conftest.py):

``pg_cluster`` (session)
    one server in a temporary directory, started once (well under a second after the first
    ``initdb``) and removed at the end of the session.
``pg_url`` (module)
    a fresh, empty database on that server for each test module: its connection URL.

:class:`PgCluster` can also be used directly for a private server that a test stops and
starts (``stop()`` / ``start()``) without disturbing the shared one.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pgserver
import psycopg
import pytest
from psycopg import sql

__all__ = ["PgCluster", "pg_cluster", "pg_url"]


class PgCluster:
    """One PostgreSQL server (pgserver) in its own directory."""

    def __init__(self, root: Path | None = None) -> None:
        self._own_root = root is None
        # Directly under /tmp: pgserver opens every parent of the data directory to the
        # unprivileged user it runs the server as (when the tests run as root).
        self.root = Path(tempfile.mkdtemp(prefix="rag-pg-")) if root is None else root
        self.server = pgserver.get_server(self.root / "data", cleanup_mode="delete")

    def url(self, dbname: str = "postgres") -> str:
        return self.server.get_uri(dbname)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database; its URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are disconnected)."""
        pgserver.pg_ctl(  # type: ignore[attr-defined]  # made at import by pgserver
            ["-w", "-m", "fast", "stop"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
        )

    def start(self) -> None:
        """Start it again on the same socket, with the same data."""
        self.server.ensure_postgres_running()

    def close(self) -> None:
        self.server.cleanup()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def pg_url(pg_cluster: PgCluster) -> str:
    return pg_cluster.create_database()
