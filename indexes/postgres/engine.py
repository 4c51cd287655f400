"""The ``postgres`` storage engine: PostgreSQL + pgvector + tsvector, shared by every replica.

The database holds everything, so a replica keeps only a small cache of collection rows. The
cache is filled on start and by :meth:`PostgresEngine.list`, read through on a miss by
:meth:`PostgresEngine.lookup`, and kept current by a LISTEN connection: every create and drop
sends a NOTIFY, so :meth:`PostgresEngine.find` sees collections made by other replicas within
a round trip. A collection dropped elsewhere that is still cached fails its next write, read
or search with :class:`~indexes.engine.CollectionGone` and leaves the cache.

Connections come from a ``psycopg_pool.AsyncConnectionPool`` that checks each connection
before lending it and reconnects in the background, so a database that goes away and comes
back needs nothing from the caller: operations fail with
:class:`~indexes.engine.StoreUnavailable` while it is away and work again once it is back.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from functools import cached_property
from typing import Any, TypeVar

import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from indexes.engine import (
    CollectionGone,
    CollectionTaken,
    IndexUnusable,
    InvalidIndex,
    StorageError,
    StoreBusy,
    StoreUnavailable,
)
from indexes.postgres import schema
from indexes.postgres.adapters import AdapterRecord, delete_adapter, list_adapters, put_adapter
from indexes.postgres.collection import PostgresCollection, apply_writes, check_storable
from indexes.postgres.errors import RETRYABLE, map_errors
from indexes.postgres.reindex import PostgresReindexer
from indexes.postgres.sql import IndexSpec, parse_index
from indexes.reindex import ModelChanged
from indexes.types import CollectionOptions, CollectionRow, DocumentWrite, WriteOutcome

__all__ = ["PostgresEngine", "database_label"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "rag_collections"
_COLS = (
    "id, name, embedding_model, dimension, index_factory, chunk_tokens, chunk_overlap, "
    "documents, chunks, extract(epoch FROM created_at)::float8, search_defaults, questions"
)


def _row(r: Sequence[Any]) -> CollectionRow:
    cid, dim, tokens, overlap, docs, chunks = (int(r[i]) for i in (0, 3, 5, 6, 7, 8))
    return CollectionRow(
        cid,
        r[1],
        r[2],
        dim,
        r[4],
        tokens,
        overlap,
        docs,
        chunks,
        float(r[9]),
        dict(r[10]),
        questions=int(r[11]),
    )


def _version(text: str) -> tuple[int, ...]:
    """(0, 6, 2) for "0.6.2"; (99,) when unknown (before open): assumed new enough."""
    parts = [p for p in text.split(".") if p.isdigit()]
    return tuple(int(p) for p in parts) if parts else (99,)


def database_label(url: str) -> str:
    """``host[:port]/dbname`` of a connection string, without user or password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(unparsable database URL)"
    host = str(info.get("host") or "localhost")
    port = f":{info['port']}" if info.get("port") else ""
    return f"{host}{port}/{info.get('dbname') or info.get('user') or ''}"


class PostgresEngine:
    """An :class:`~indexes.engine.Engine` over one PostgreSQL database (pgvector >= 0.6).

    ``ef_search`` is pgvector's ``hnsw.ef_search`` for HNSW collections (raised to the search
    depth when that is larger). A filtered HNSW search that comes back short is redone
    exactly when fewer than ``exact_scan_below`` chunks pass the filter, else with a wider
    ef_search first (see :meth:`PostgresCollection._dense`). ``pool_timeout`` bounds the
    wait for a connection (then :class:`StoreUnavailable`); ``lock_timeout`` bounds a
    write's wait for locks held by other writers (then :class:`StoreBusy`). Every
    collection records its own embedding model and dimension.
    """

    name = "postgres"

    def __init__(
        self,
        url: str,
        *,
        ef_search: int = 64,
        pool_min: int = 1,
        pool_max: int = 10,
        pool_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        lock_timeout: float = 10.0,
        reconnect_timeout: float = 300.0,
        exact_scan_below: int = 5000,
        listen: bool = True,
        application_name: str = "rag-service",
    ) -> None:
        if not 1 <= ef_search <= 1000:
            raise ValueError(f"ef_search must be between 1 and 1000, got {ef_search}")
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ValueError(
                f"need 0 <= pool_min <= pool_max and pool_max >= 1, got {pool_min}, {pool_max}"
            )
        self.url = url
        self.ef_search = ef_search
        self.exact_scan_below = exact_scan_below
        self._pool_min, self._pool_max = pool_min, pool_max
        self._pool_timeout = pool_timeout
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = reconnect_timeout
        self._listen_enabled = listen
        self._conn_kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, round(connect_timeout)),
            "application_name": application_name,
        }
        self._write_prelude = f"SET LOCAL lock_timeout = '{max(1, round(lock_timeout * 1000))}ms'"
        self._label = database_label(url)
        self._pool: AsyncConnectionPool | None = None
        self._collections: dict[str, PostgresCollection] = {}
        self._schema_version = 0
        self._pgvector = ""
        self._connected = False
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, migrate the schema, open the pool, load the collections, start listening."""
        if self._pool is not None:
            return
        self._closing = False
        try:
            conn = await AsyncConnection.connect(self.url, **self._conn_kwargs)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to the database {self._label}: {exc}") from exc
        async with conn:
            with map_errors(self._label):
                self._schema_version, self._pgvector = await schema.migrate(conn, self._label)
        pool: AsyncConnectionPool = AsyncConnectionPool(
            self.url,
            min_size=self._pool_min,
            max_size=self._pool_max,
            kwargs=dict(self._conn_kwargs),
            configure=register_vector_async,
            check=AsyncConnectionPool.check_connection,
            timeout=self._pool_timeout,
            reconnect_timeout=self._reconnect_timeout,
            name=f"rag-{self._label}",
            open=False,
        )
        self._pool = pool
        try:
            with map_errors(self._label):
                await pool.open(wait=self._pool_min > 0, timeout=self._connect_timeout * 2)
            await self.list()
        except BaseException:
            self._pool = None
            await pool.close()
            raise
        self._connected = True
        self._spawn(self._sweep())
        if self._listen_enabled:
            self._listener = asyncio.create_task(self._listen(), name="rag-postgres-listen")

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            await _stop(self._listener)
            self._listener = None
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=10)
            for task in pending:
                task.cancel()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._connected = False
        self._collections.clear()

    async def ping(self, timeout: float = 2.0) -> bool:
        """Whether the database answers now (for /ready); updates :meth:`describe`."""
        if self._pool is None:
            return False
        try:
            async with self._connection(timeout=timeout) as conn:
                await conn.execute("SELECT 1")
        except StorageError:
            return False
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "database": self._label,
            "connected": self._connected and self._pool is not None,
            "schema_version": self._schema_version,
            "pgvector": self._pgvector,
            "collections": len(self._collections),
        }

    # ---- collections -------------------------------------------------------------------
    def check_index(self, index: str, dimension: int) -> None:
        """:class:`~indexes.engine.InvalidIndex` (a ValueError) unless ``index`` is ``Flat``
        or ``HNSW<M>[,ef_construction=<n>]`` within pgvector's limits."""
        if parse_index(index, dimension).hnsw and _version(self._pgvector) < (0, 5):
            raise InvalidIndex(
                f"pgvector {self._pgvector} in this database has no HNSW index (0.5 or newer "
                "does): use index 'Flat', or upgrade the extension"
            )

    def find(self, name: str) -> PostgresCollection | None:
        """The cached collection (see the module's docstring); :meth:`lookup` also asks the
        database on a miss."""
        return self._collections.get(name)

    def get(self, name: str) -> PostgresCollection:
        col = self.find(name)
        if col is None:
            raise CollectionGone(f"collection {name!r} not found")
        return col

    async def lookup(self, name: str) -> PostgresCollection | None:
        """Like :meth:`find`, asking the database when the cache does not know ``name``."""
        col = self.find(name)
        if col is not None:
            return col
        async with self._connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLS} FROM rag_collections WHERE name = %s", (name,)
            )
            r = await cur.fetchone()
        return None if r is None else self._remember(_row(r))

    async def list(self) -> list[CollectionRow]:
        async with self._connection() as conn:
            cur = await conn.execute(f"SELECT {_COLS} FROM rag_collections ORDER BY name")
            rows = [_row(r) for r in await cur.fetchall()]
        known = {r.name for r in rows}
        for name in [n for n in self._collections if n not in known]:
            del self._collections[name]
        for r in rows:
            self._remember(r)
        return rows

    async def create(self, options: CollectionOptions) -> PostgresCollection:
        self.check_index(options.index, options.dimension)
        spec = parse_index(options.index, options.dimension)

        async def body(conn: AsyncConnection) -> CollectionRow:
            row = await self._insert_collection(conn, options, spec)
            if row is None:
                raise CollectionTaken(f"collection {options.name!r} already exists")
            return row

        return self._remember(await self._write(body))

    async def upsert_new(
        self, options: CollectionOptions, writes: Sequence[DocumentWrite]
    ) -> tuple[PostgresCollection, WriteOutcome]:
        self.check_index(options.index, options.dimension)
        spec = parse_index(options.index, options.dimension)
        check_storable(writes)

        async def body(conn: AsyncConnection) -> tuple[CollectionRow, WriteOutcome]:
            row = await self._insert_collection(conn, options, spec)
            for _ in range(3):  # made now, or exists (and may be dropped under us)
                if row is not None:
                    break
                cur = await conn.execute(
                    f"SELECT {_COLS} FROM rag_collections WHERE name = %s FOR KEY SHARE",
                    (options.name,),
                )
                found = await cur.fetchone()
                row = _row(found) if found else await self._insert_collection(conn, options, spec)
            if row is None:
                raise StoreBusy(f"collection {options.name!r} is being dropped; retry")
            if row.embedding_model != options.embedding_model:
                # Made (or reindexed) with another model since the caller looked it up:
                # the caller embeds again with the collection's model, as with the embedded
                # engine's upsert_new; the cache learns the row it will look up.
                self._remember(row)
                raise ModelChanged(
                    f"collection {row.name!r} is embedded with {row.embedding_model} now, "
                    f"not {options.embedding_model}"
                )
            if row.dimension != options.dimension:
                raise IndexUnusable(
                    f"collection {row.name!r} holds vectors of {row.embedding_model!r} "
                    f"(dimension {row.dimension}), not of {options.embedding_model!r} "
                    f"(dimension {options.dimension})"
                )
            outcome, documents, chunks, questions = await apply_writes(conn, row, writes)
            return replace(row, documents=documents, chunks=chunks, questions=questions), outcome

        row, outcome = await self._write(body)
        return self._remember(row), outcome

    async def drop(self, name: str) -> None:
        async def body(conn: AsyncConnection) -> int | None:
            cur = await conn.execute(
                "SELECT id FROM rag_collections WHERE name = %s FOR UPDATE", (name,)
            )
            found = await cur.fetchone()
            if found is None:
                return None
            cid = int(found[0])
            table = schema.partition_name(cid)
            cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
            exists = await cur.fetchone()
            if exists and exists[0]:
                await conn.execute(f"TRUNCATE {table}")  # the chunks go with the commit
            await conn.execute("DELETE FROM rag_collections WHERE id = %s", (cid,))
            await _notify(conn, {"op": "dropped", "id": cid, "name": name})
            return cid

        cid = await self._write(body)
        self._collections.pop(name, None)
        if cid is None:
            raise CollectionGone(f"collection {name!r} not found")
        self._spawn(self._drop_partition(cid))

    async def configure(self, name: str, search: dict[str, Any]) -> CollectionRow:
        async def body(conn: AsyncConnection) -> CollectionRow | None:
            cur = await conn.execute(
                f"UPDATE rag_collections SET search_defaults = %s WHERE name = %s "
                f"RETURNING {_COLS}",
                (Jsonb(search), name),
            )
            found = await cur.fetchone()
            if found is None:
                return None
            row = _row(found)
            await _notify(conn, {"op": "updated", "row": asdict(row)})
            return row

        row = await self._write(body)
        if row is None:
            self._collections.pop(name, None)
            raise CollectionGone(f"collection {name!r} not found")
        return self._remember(row).row

    @cached_property
    def reindexer(self) -> PostgresReindexer:
        """Moves collections to another embedding model (:mod:`indexes.postgres.reindex`)."""
        return PostgresReindexer(self)

    # ---- the shared adapter registry ----------------------------------------------------
    async def adapters_list(self) -> builtins.list[AdapterRecord]:
        async with self._connection() as conn:
            return await list_adapters(conn)

    async def adapters_put(
        self,
        name: str,
        path: str,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AdapterRecord:
        async with self._connection() as conn:
            return await put_adapter(conn, name, path, rank=rank, alpha=alpha, metadata=metadata)

    async def adapters_delete(self, name: str) -> bool:
        async with self._connection() as conn:
            return await delete_adapter(conn, name)

    # ---- API keys (the KeyRowStore capability) ------------------------------------------
    async def api_keys_load(self) -> builtins.list[tuple[str, str, bytes, str, str, float]]:
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT id, name, digest, hint, scopes::text, created_at FROM rag_api_keys"
            )
            return [
                (str(r[0]), str(r[1]), bytes(r[2]), str(r[3]), str(r[4]), float(r[5]))
                for r in await cur.fetchall()
            ]

    async def api_keys_insert(self, row: tuple[str, str, bytes, str, str, float]) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO rag_api_keys (id, name, digest, hint, scopes, created_at) "
                "VALUES (%s, %s, %s, %s, %s::jsonb, %s)",
                row,
            )

    async def api_keys_delete(self, key_id: str) -> bool:
        async with self._connection() as conn:
            cur = await conn.execute("DELETE FROM rag_api_keys WHERE id = %s", (key_id,))
            return cur.rowcount > 0

    # ---- internals ---------------------------------------------------------------------
    @asynccontextmanager
    async def _connection(self, timeout: float | None = None) -> AsyncIterator[AsyncConnection]:
        """A pooled connection (autocommit); psycopg's errors inside become storage errors."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("the postgres engine is not open")
        try:
            with map_errors(self._label):
                async with pool.connection(timeout=timeout) as conn:
                    yield conn
        except StoreUnavailable:
            self._connected = False
            raise
        self._connected = True

    async def _write(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``body`` in one write transaction; once more if the database aborted it for a
        serialization failure or a deadlock (nothing of it was committed)."""
        for attempt in (1, 2):
            try:
                async with self._connection() as conn, conn.transaction():
                    await conn.execute(self._write_prelude)
                    return await body(conn)
            except StoreBusy as exc:
                if attempt == 2 or not isinstance(exc.__cause__, RETRYABLE):
                    raise
                log.info("retrying a write transaction: %s", exc)
        raise AssertionError("unreachable")

    async def _insert_collection(
        self, conn: AsyncConnection, options: CollectionOptions, spec: IndexSpec
    ) -> CollectionRow | None:
        """Insert the collection and its partition in the caller's transaction; None when the
        name is taken."""
        cur = await conn.execute(
            "INSERT INTO rag_collections (name, embedding_model, dimension, index_factory, "
            "chunk_tokens, chunk_overlap, search_defaults) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            f"ON CONFLICT (name) DO NOTHING RETURNING {_COLS}",
            (
                options.name,
                options.embedding_model,
                options.dimension,
                options.index,
                options.chunk_tokens,
                options.chunk_overlap,
                Jsonb(options.search),
            ),
        )
        found = await cur.fetchone()
        if found is None:
            return None
        row = _row(found)
        await schema.create_partition(conn, row.id, row.dimension, spec)
        await _notify(conn, {"op": "created", "row": asdict(row)})
        return row

    def _remember(self, row: CollectionRow) -> PostgresCollection:
        col = self._collections.get(row.name)
        if col is not None and col.row.id == row.id:
            col._refresh(row)
            return col
        col = PostgresCollection(self, row)
        self._collections[row.name] = col
        return col

    def _forget(self, col: PostgresCollection) -> None:
        if self._collections.get(col.row.name) is col:
            del self._collections[col.row.name]

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        """Run ``coro`` in the background; :meth:`close` waits for it (10 s, then cancels)."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drop_partition(self, cid: int) -> None:
        """Detach and drop a dropped collection's (emptied) partition, without blocking the
        other collections; what fails here the next start's sweep finishes."""
        try:
            async with self._connection() as conn:
                await schema.drop_partition(conn, schema.partition_name(cid), True, False)
        except (StorageError, ValueError) as exc:
            log.warning("could not remove the chunk partition of collection %d: %s", cid, exc)

    async def _sweep(self) -> None:
        """Remove partitions left by drops that did not finish (a crash, a lost connection)."""
        try:
            async with self._connection() as conn:
                for table, attached, pending in await schema.orphan_partitions(conn):
                    log.info("removing orphaned chunk partition %s", table)
                    await schema.drop_partition(conn, table, attached, pending)
        except (StorageError, ValueError) as exc:
            log.warning("could not remove orphaned chunk partitions: %s", exc)

    async def _listen(self) -> None:
        """Follow other replicas' creates and drops; reconnects (and re-reads the list of
        collections, for what it missed) after losing the database. Its connection is also
        the engine's pulse: the server closing it marks the engine disconnected at once,
        for :meth:`describe`, without waiting for a request to fail."""
        delay = 0.2
        listening = False
        while not self._closing:
            try:
                conn = await AsyncConnection.connect(self.url, **self._conn_kwargs)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await self.list()
                    delay, listening = 0.2, True
                    async for note in conn.notifies():
                        self._on_notify(note.payload)
            except (psycopg.Error, StorageError, OSError, ValueError) as exc:
                if isinstance(exc, psycopg.OperationalError | StoreUnavailable | OSError):
                    self._connected = False
                level = logging.WARNING if listening else logging.DEBUG
                log.log(level, "collection listener: %s; reconnecting in %.1fs", exc, delay)
                listening = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _on_notify(self, payload: str) -> None:
        try:
            note = json.loads(payload)
            if note["op"] == "created":
                row = CollectionRow(**note["row"])
                cached = self._collections.get(row.name)
                if cached is None or cached.row.id != row.id:
                    self._remember(row)
            elif note["op"] == "updated":
                row = CollectionRow(**note["row"])
                cached = self._collections.get(row.name)
                if cached is not None and cached.row.id == row.id:
                    cached._refresh(replace(cached.row, search=row.search))
            elif note["op"] == "dropped":
                cached = self._collections.get(note["name"])
                if cached is not None and cached.row.id == note["id"]:
                    self._forget(cached)
            elif note["op"] == "reindexed":  # another embedding model (indexes.reindex)
                cached = self._collections.get(note["name"])
                if cached is not None and cached.row.id == note["id"]:
                    model, dimension = str(note["embedding_model"]), int(note["dimension"])
                    cached._refresh(replace(cached.row, embedding_model=model, dimension=dimension))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable collection notification: %.200s", payload)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end. A cancellation can be lost on Python 3.11
    (``asyncio.wait_for`` inside a library that finishes as it is cancelled swallows it), so
    it is sent again until the task ends, for at most 10 s."""
    for _ in range(50):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
            return
    log.warning("the background task %s did not stop", task.get_name())


async def _notify(conn: AsyncConnection, note: dict[str, Any]) -> None:
    """Tell every replica's listener (delivered when the transaction commits). A creation
    carries the whole row, so the listener needs no query to cache it."""
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(note)))
