"""The postgres engine's reindex jobs (see :mod:`indexes.reindex` for what every engine shares).

Tables (migration 5 of :mod:`indexes.postgres.schema`): ``rag_reindex_jobs`` (one row per job)
and ``rag_reindex_vectors`` (``(collection_id, key) -> vector`` of the new model), both deleted
with their collection.

Claims are session advisory locks (``pg_try_advisory_lock``) held on a connection of the
runner's own, outside the pool, for as long as it works on the job: the server releases them
the moment that process dies or loses its connection, so another replica (or the same one,
restarted) can take the job over (:meth:`PostgresReindexer.stalled`) and no two runners ever
work on one collection at once.

The swap first catches up while writes go on (:func:`~indexes.reindex.catch_up`, pass after
pass until one finds nothing new, :data:`~indexes.reindex.CATCH_UP_ROUNDS` at most). Then one write
transaction: the collection's row ``FOR UPDATE`` (writers, which take ``FOR KEY SHARE``, wait),
the small rest of the catch-up, then, on the collection's partition, its HNSW index and
dimension constraint dropped, every ``embedding`` set from the shadow table and the constraint
made again for the new dimension; the questions' vectors, the collection's model and dimension,
the job's state and the shadow rows change in the same transaction, and a NOTIFY tells the
other replicas. From the ``DROP INDEX`` on, searches of that collection wait for the commit
(one that began before it sees the old rows under its snapshot), so they see one model or the
other, never a mix; the wait grows with the collection (every row is rewritten). Every search
and write also checks, inside its own transaction, that the collection still records the model
its vectors came from (:func:`check_model`).

Writers of the collection wait for that transaction for as long as it runs, and one that waits
longer than the engine's ``lock_timeout`` (10 s by default) gives up with
:class:`~indexes.engine.StoreBusy`, which the service answers 503 with ``Retry-After: 1``:
expect a few short 503s on writes to a large collection at the moment of its swap (searches
only wait). Clients that retry on 503, as they should for any busy store, see nothing else.

An HNSW collection's index is built again after the commit, ``CONCURRENTLY`` (a build inside
the transaction would index the old row versions too, which other snapshots may still see,
and fail on their dimension); meanwhile its searches are exact. A build that a crash or a
lost connection interrupted is finished by a background task that
:meth:`PostgresReindexer.stalled` starts (every replica calls it at start and every few
seconds), so a long build never holds up a start.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import psycopg
from psycopg import AsyncConnection

from indexes.engine import CollectionGone, StorageError, StoreUnavailable
from indexes.postgres.errors import map_errors
from indexes.postgres.schema import create_hnsw_index, partition_name
from indexes.postgres.sql import IndexSpec, parse_index
from indexes.questions import QUESTION_ID_OFFSET
from indexes.reindex import (
    CATCH_UP_BATCH,
    CATCH_UP_ROUNDS,
    Embed,
    ModelChanged,
    ReindexJob,
    ReindexRunning,
    catch_up,
    decide_resume,
)
from indexes.types import CollectionRow

if TYPE_CHECKING:
    from indexes.postgres.collection import PostgresCollection
    from indexes.postgres.engine import PostgresEngine

__all__ = ["PostgresClaim", "PostgresReindexer", "check_model"]

log = logging.getLogger(__name__)

_JOB_COLS = (
    "j.id, c.name, j.collection_id, j.embedding_model, j.dimension, j.source_model, j.state, "
    "j.done, j.total, j.error, extract(epoch FROM j.created_at)::float8, "
    "extract(epoch FROM j.updated_at)::float8"
)
_JOBS = (
    f"SELECT {_JOB_COLS} FROM rag_reindex_jobs j JOIN rag_collections c ON c.id = j.collection_id"
)


# HNSW collections whose partition has no valid HNSW index (a build a crash interrupted).
_MISSING_HNSW = """
SELECT c.id, c.index_factory, c.dimension FROM rag_collections c
WHERE c.index_factory LIKE 'HNSW%' AND NOT EXISTS (
    SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
    WHERE i.relname = 'rag_chunks_' || c.id || '_hnsw' AND x.indisvalid)
"""
_INVALID_INDEX = """
SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
WHERE i.relname = %s AND NOT x.indisvalid
"""


def _claim_key(collection_id: int) -> int:
    """The advisory lock key of a collection's reindex (distinct from the write locks')."""
    digest = hashlib.blake2b(f"reindex\x00{int(collection_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def check_model(conn: AsyncConnection, collection: PostgresCollection, model: str) -> None:
    """:class:`~indexes.reindex.ModelChanged` unless the collection records ``model`` in the
    database as seen by ``conn``'s transaction; the cached row is refreshed first, so the
    caller's next attempt embeds with the model the collection uses now."""
    cur = await conn.execute(
        "SELECT embedding_model, dimension FROM rag_collections WHERE id = %s",
        (collection.row.id,),
    )
    found = await cur.fetchone()
    if found is None or found[0] == model:
        return  # a dropped collection is the caller's own check
    collection._refresh(
        replace(collection.row, embedding_model=str(found[0]), dimension=int(found[1]))
    )
    raise ModelChanged(
        f"collection {collection.row.name!r} is embedded with {found[0]} now, not {model}"
    )


async def _read_job(conn: AsyncConnection, job_id: int) -> ReindexJob:
    cur = await conn.execute(f"{_JOBS} WHERE j.id = %s", (job_id,))
    found = await cur.fetchone()
    if found is None:
        raise CollectionGone("the collection of this reindex was deleted")
    return ReindexJob.from_row(found)


async def _keys_total(conn: AsyncConnection, collection_id: int, lock: str = "") -> int:
    cur = await conn.execute(
        f"SELECT chunks + questions FROM rag_collections WHERE id = %s {lock}", (collection_id,)
    )
    found = await cur.fetchone()
    if found is None:
        raise CollectionGone("the collection of this reindex was deleted")
    return int(found[0])


async def _pending(
    conn: AsyncConnection, collection_id: int, after: int, limit: int
) -> builtins.list[tuple[int, str]]:
    cid = int(collection_id)
    cur = await conn.execute(
        f"SELECT c.id, c.text FROM rag_chunks c WHERE c.collection_id = {cid} AND c.id > %s "
        "AND NOT EXISTS (SELECT 1 FROM rag_reindex_vectors v "
        f"WHERE v.collection_id = {cid} AND v.key = c.id) ORDER BY c.id LIMIT %s",
        (after, limit),
    )
    rows = list(await cur.fetchall())
    if len(rows) < limit:
        cur = await conn.execute(
            f"SELECT q.id + {QUESTION_ID_OFFSET}, q.text FROM rag_questions q "
            f"WHERE q.collection_id = {cid} AND q.id > %s AND NOT EXISTS (SELECT 1 FROM "
            f"rag_reindex_vectors v WHERE v.collection_id = {cid} "
            f"AND v.key = q.id + {QUESTION_ID_OFFSET}) ORDER BY q.id LIMIT %s",
            (max(after - QUESTION_ID_OFFSET, 0), limit - len(rows)),
        )
        rows += await cur.fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


async def _insert_vectors(
    conn: AsyncConnection, job: ReindexJob, keys: Sequence[int], vectors: np.ndarray
) -> None:
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    if vecs.shape != (len(keys), job.dimension):
        raise ValueError(f"{len(keys)} keys need vectors of shape ({len(keys)}, {job.dimension})")
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO rag_reindex_vectors (collection_id, key, embedding) VALUES (%s, %s, %s) "
            "ON CONFLICT (collection_id, key) DO UPDATE SET embedding = EXCLUDED.embedding",
            [(job.collection_id, int(k), v) for k, v in zip(keys, vecs, strict=True)],
        )


async def _check_running(conn: AsyncConnection, job: ReindexJob) -> None:
    cur = await conn.execute(
        "SELECT state FROM rag_reindex_jobs WHERE id = %s FOR UPDATE", (job.id,)
    )
    found = await cur.fetchone()
    if found is None:
        raise CollectionGone(f"collection {job.collection!r} was deleted")
    if found[0] != "running":
        raise ReindexRunning(f"the reindex of {job.collection!r} was replaced by another")


async def build_hnsw_index(
    engine: PostgresEngine, collection_id: int, dimension: int, spec: IndexSpec
) -> None:
    """(Re)build a partition's HNSW index without blocking its searches or writes; an
    invalid one left by an interrupted build is dropped first. Failures are logged: the
    collection is searched exactly until a later :meth:`PostgresReindexer.stalled` builds it."""
    table = partition_name(collection_id)
    started = time.perf_counter()
    try:
        async with engine._connection() as conn:
            cur = await conn.execute(_INVALID_INDEX, (f"{table}_hnsw",))
            if await cur.fetchone() is not None:
                await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {table}_hnsw")
            await create_hnsw_index(conn, table, dimension, spec, concurrently=True)
    except (StorageError, ValueError) as exc:
        log.warning("the HNSW index of %s could not be built (searches are exact): %s", table, exc)
        return
    log.info("built the HNSW index of %s in %.1f s", table, time.perf_counter() - started)


class PostgresReindexer:
    """:class:`~indexes.reindex.Reindexer` of a :class:`~indexes.postgres.PostgresEngine`."""

    def __init__(self, engine: PostgresEngine) -> None:
        self._engine = engine
        self._repair: asyncio.Task[None] | None = None

    async def jobs(self) -> builtins.list[ReindexJob]:
        async with self._engine._connection() as conn:
            cur = await conn.execute(
                f"SELECT DISTINCT ON (j.collection_id) {_JOB_COLS} FROM rag_reindex_jobs j "
                "JOIN rag_collections c ON c.id = j.collection_id "
                "ORDER BY j.collection_id, j.id DESC"
            )
            rows = await cur.fetchall()
        return sorted((ReindexJob.from_row(r) for r in rows), key=lambda j: j.collection)

    async def _lock(self, collection_id: int) -> AsyncConnection | None:
        """A connection holding the collection's reindex claim, or None when another holds it."""
        engine = self._engine
        try:
            conn = await AsyncConnection.connect(engine.url, **engine._conn_kwargs)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to the database: {exc}") from exc
        try:
            with map_errors("for a reindex"):
                cur = await conn.execute(
                    "SELECT pg_try_advisory_lock(%s)", (_claim_key(collection_id),)
                )
                got = await cur.fetchone()
        except BaseException:
            await conn.close()
            raise
        if got is None or not got[0]:
            await conn.close()
            return None
        return conn

    def _start_repair(self) -> None:
        """Build, in the background, the HNSW indexes that a swap dropped and a crash kept
        from being built again (one repair at a time; each build takes the collection's
        claim, so a swap that is building its own index is left alone)."""
        if self._repair is None or self._repair.done():
            self._repair = self._engine._spawn(self._repair_indexes())

    async def _repair_indexes(self) -> None:
        try:
            async with self._engine._connection() as conn:
                cur = await conn.execute(_MISSING_HNSW)
                rows = await cur.fetchall()
        except StorageError as exc:
            log.warning("could not look for HNSW indexes to build: %s", exc)
            return
        for cid, factory, dimension in rows:
            try:
                spec = parse_index(str(factory), int(dimension))
            except ValueError:
                continue
            try:
                lock = await self._lock(int(cid))
            except StorageError as exc:
                log.warning("could not claim collection %s to build its HNSW index: %s", cid, exc)
                return
            if lock is None:
                continue  # its reindex is building it
            try:
                await build_hnsw_index(self._engine, int(cid), int(dimension), spec)
            finally:
                await lock.close()

    async def start(self, name: str, embedding_model: str, dimension: int) -> PostgresClaim:
        collection = await self._engine.lookup(name)
        if collection is None:
            raise CollectionGone(f"collection {name!r} not found")
        cid = int(collection.row.id)
        lock = await self._lock(cid)
        if lock is None:
            raise ReindexRunning(f"collection {name!r} is being reindexed already")

        async def body(conn: AsyncConnection) -> ReindexJob:
            total = await _keys_total(conn, cid, "FOR KEY SHARE")
            cur = await conn.execute(
                "SELECT embedding_model FROM rag_collections WHERE id = %s", (cid,)
            )
            source = (await cur.fetchone() or ("",))[0]
            cur = await conn.execute(
                "SELECT id, embedding_model, dimension, state FROM rag_reindex_jobs "
                "WHERE collection_id = %s ORDER BY id DESC LIMIT 1 FOR UPDATE",
                (cid,),
            )
            latest = await cur.fetchone()
            last = None if latest is None else (latest[1], latest[2], latest[3])
            decision = decide_resume(last, embedding_model, dimension)
            if latest is not None and decision == "resume":
                job_id = int(latest[0])
                await conn.execute(
                    "UPDATE rag_reindex_jobs SET state = 'running', error = NULL, total = %s, "
                    "updated_at = now() WHERE id = %s",
                    (total, job_id),
                )
            else:
                if latest is not None and decision == "replace":
                    await conn.execute(
                        "UPDATE rag_reindex_jobs SET state = 'failed', error = %s, "
                        "updated_at = now() WHERE id = %s",
                        (f"replaced by a reindex to {embedding_model}", latest[0]),
                    )
                await conn.execute(
                    "DELETE FROM rag_reindex_vectors WHERE collection_id = %s", (cid,)
                )
                cur = await conn.execute(
                    "INSERT INTO rag_reindex_jobs (collection_id, embedding_model, dimension, "
                    "source_model, state, total) VALUES (%s, %s, %s, %s, 'running', %s) "
                    "RETURNING id",
                    (cid, embedding_model, dimension, source, total),
                )
                job_id = int((await cur.fetchone() or (0,))[0])
            return await _read_job(conn, job_id)

        try:
            job = await self._engine._write(body)
        except BaseException:
            await lock.close()
            raise
        return PostgresClaim(self._engine, collection, job, lock)

    async def stalled(self) -> builtins.list[PostgresClaim]:
        """Claims on the running jobs whose runner is gone (and, in the background, the
        HNSW indexes that a crash kept a swap from building again are built). When a step
        fails partway, the claims already taken are given up before the error goes on: a
        claim nobody runs would keep the job from every replica for as long as this process
        lives."""
        self._start_repair()
        claims: builtins.list[PostgresClaim] = []
        try:
            for job in await self.jobs():
                if job.state != "running":
                    continue
                collection = await self._engine.lookup(job.collection)
                if collection is None or collection.row.id != job.collection_id:
                    continue
                lock = await self._lock(job.collection_id)
                if lock is None:
                    continue  # its runner is alive (here or in another replica)
                claims.append(PostgresClaim(self._engine, collection, job, lock))
        except BaseException:
            for claim in claims:
                with contextlib.suppress(Exception):
                    await claim.release()
            raise
        return claims


class PostgresClaim:
    """A claimed job of the postgres engine (:class:`~indexes.reindex.ReindexClaim`)."""

    def __init__(
        self,
        engine: PostgresEngine,
        collection: PostgresCollection,
        job: ReindexJob,
        lock: AsyncConnection,
    ) -> None:
        self._engine = engine
        self._collection = collection
        self._job = job
        self._lock = lock

    @property
    def job(self) -> ReindexJob:
        return self._job

    async def pending(self, after: int, limit: int) -> builtins.list[tuple[int, str]]:
        async with self._engine._connection() as conn:
            return await _pending(conn, self._job.collection_id, after, limit)

    async def store(self, keys: Sequence[int], vectors: np.ndarray) -> ReindexJob:
        job = self._job

        async def body(conn: AsyncConnection) -> ReindexJob:
            total = await _keys_total(conn, job.collection_id, "FOR KEY SHARE")
            await _check_running(conn, job)
            await _insert_vectors(conn, job, keys, vectors)
            await conn.execute(
                "UPDATE rag_reindex_jobs SET done = least(done + %s, %s), total = %s, "
                "updated_at = now() WHERE id = %s",
                (len(keys), total, total, job.id),
            )
            return await _read_job(conn, job.id)

        self._job = await self._engine._write(body)
        return self._job

    async def fail(self, error: str) -> None:
        job_id = self._job.id

        async def body(conn: AsyncConnection) -> None:
            await conn.execute(
                "UPDATE rag_reindex_jobs SET state = 'failed', error = %s, updated_at = now() "
                "WHERE id = %s AND state = 'running'",
                (error[:2000], job_id),
            )

        await self._engine._write(body)
        self._job = replace(self._job, state="failed", error=error)

    async def release(self) -> None:
        if not self._lock.closed:
            await self._lock.close()

    async def swap(self, embed: Embed) -> CollectionRow:
        from indexes.postgres.engine import CHANNEL  # the engine imports this module's users

        # While writes go on, until what is left is small: the transaction below holds the
        # collection's writers off while it embeds the rest.
        for _ in range(CATCH_UP_ROUNDS):
            if await catch_up(self, embed) == 0:
                break
        job = self._job
        cid = job.collection_id
        table = partition_name(cid)

        async def body(conn: AsyncConnection) -> int:
            cur = await conn.execute(
                "SELECT index_factory FROM rag_collections WHERE id = %s FOR UPDATE", (cid,)
            )
            found = await cur.fetchone()
            if found is None:
                raise CollectionGone(f"collection {job.collection!r} was deleted")
            await _check_running(conn, job)
            while True:  # writers wait for the row lock: this ends, and it is small
                missing = await _pending(conn, cid, 0, CATCH_UP_BATCH)
                if not missing:
                    break
                vectors = await embed([t for _, t in missing])
                await _insert_vectors(conn, job, [k for k, _ in missing], vectors)
            dim = int(job.dimension)
            await conn.execute(f"DROP INDEX IF EXISTS {table}_hnsw")
            await conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {table}_dims")
            cur = await conn.execute(
                f"UPDATE {table} c SET embedding = v.embedding FROM rag_reindex_vectors v "
                f"WHERE v.collection_id = {cid} AND v.key = c.id"
            )
            updated = cur.rowcount
            cur = await conn.execute(
                f"UPDATE rag_questions q SET embedding = v.embedding FROM rag_reindex_vectors v "
                f"WHERE q.collection_id = {cid} AND v.collection_id = {cid} "
                f"AND v.key = q.id + {QUESTION_ID_OFFSET}"
            )
            updated += cur.rowcount
            total = await _keys_total(conn, cid)
            cur = await conn.execute(
                f"SELECT (SELECT count(*) FROM {table}) + "
                f"(SELECT count(*) FROM rag_questions WHERE collection_id = {cid})"
            )
            stored = int((await cur.fetchone() or (0,))[0])
            if updated != stored:
                raise StorageError(
                    f"{stored - updated} vectors of {job.embedding_model} are missing from the "
                    f"reindex of {job.collection!r}"
                )
            await conn.execute(
                f"ALTER TABLE {table} ADD CONSTRAINT {table}_dims "
                f"CHECK (vector_dims(embedding) = {dim})"
            )
            await conn.execute(
                "UPDATE rag_collections SET embedding_model = %s, dimension = %s WHERE id = %s",
                (job.embedding_model, dim, cid),
            )
            await conn.execute("DELETE FROM rag_reindex_vectors WHERE collection_id = %s", (cid,))
            await conn.execute(
                "UPDATE rag_reindex_jobs SET state = 'done', done = %s, total = %s, error = NULL, "
                "updated_at = now() WHERE id = %s",
                (total, total, job.id),
            )
            note = {
                "op": "reindexed",
                "id": cid,
                "name": job.collection,
                "embedding_model": job.embedding_model,
                "dimension": dim,
            }
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(note)))
            return total

        total = await self._engine._write(body)
        self._job = replace(job, state="done", done=total, total=total)
        spec = parse_index(self._collection.row.index_factory, job.dimension)
        if spec.hnsw:  # still claimed: a repair elsewhere waits for this build
            await build_hnsw_index(self._engine, cid, job.dimension, spec)
        row = replace(
            self._collection.row, embedding_model=job.embedding_model, dimension=job.dimension
        )
        self._collection._refresh(row)
        cached = self._engine.find(job.collection)
        if cached is not None and cached is not self._collection and cached.row.id == cid:
            cached._refresh(
                replace(cached.row, embedding_model=row.embedding_model, dimension=row.dimension)
            )
        log.info("collection %r now embedded with %s", job.collection, job.embedding_model)
        return row
