"""The embedded engine's reindex jobs: SQLite tables beside the documents, and a swap under the
collection's locks. :mod:`indexes.reindex` describes what every engine shares.

Tables (migration 4 of :mod:`indexes.docstore`): ``reindex_jobs``, one row per job (collection,
target model and dimension, the model it started from, state, done / total, error, times), and
``reindex_vectors``, the shadow vectors (key -> float32 blob of the new model). Both go with
their collection (``ON DELETE CASCADE``). Keys are globally unique (chunk ids come from one
AUTOINCREMENT table, question keys are offset above them), so ``key`` alone is the primary key.

Claims are a set of collection ids in this process: the engine is one process, so a job found
``running`` at start was left by a runner that died with the previous one, and
:meth:`EmbeddedReindexer.stalled` claims it.

The swap first catches up and builds the new FAISS index from the shadow vectors while writes
go on: it embeds whatever lacks a shadow vector, builds the index off the event loop (minutes
for a large HNSW index), then brings that private index up to what writes did meanwhile,
pass after pass until one finds nothing new (:data:`~indexes.reindex.CATCH_UP_ROUNDS` at most).
Only then does it take the collection's writer lock (its upserts and deletes wait, searches go
on) for the small rest: it embeds the keys still without a shadow vector, adds them to the new
index and removes what was deleted, then on the store's writer thread opens one transaction
that rewrites every chunk's and question's embedding, the collection's model and dimension,
drops the shadow rows and marks the job done, and commits it under the collection's write
lock while swapping in the new index and row. A search holds the read lock for all of its work
(index, stored chunk vectors, rows), so it sees all of the old state or all of the new. A
crash before the commit leaves the old model serving and the job resumable; after it, the old
snapshot no longer matches the collection's model and is rebuilt from the store at restart.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from indexes.docstore import DocumentStore
from indexes.engine import CollectionGone, StorageError
from indexes.faiss_index import FaissIndex
from indexes.questions import QUESTION_ID_OFFSET
from indexes.reindex import (
    CATCH_UP_ROUNDS,
    Embed,
    ReindexJob,
    ReindexRunning,
    catch_up,
    decide_resume,
)
from indexes.types import CollectionRow

if TYPE_CHECKING:
    from indexes.embedded import EmbeddedCollection, EmbeddedEngine

__all__ = ["EmbeddedClaim", "EmbeddedReindexer"]

_SQL_VARS = 900
_JOB_COLS = (
    "j.id, c.name, j.collection_id, j.embedding_model, j.dimension, j.source_model, j.state, "
    "j.done, j.total, j.error, j.created_at, j.updated_at"
)
_JOBS = f"SELECT {_JOB_COLS} FROM reindex_jobs j JOIN collections c ON c.id = j.collection_id"


def _read_job(conn: Any, job_id: int) -> ReindexJob:
    found = conn.execute(f"{_JOBS} WHERE j.id = ?", (job_id,)).fetchone()
    if found is None:
        raise CollectionGone("the collection of this reindex was deleted")
    return ReindexJob.from_row(found)


def _keys_total(conn: Any, collection_id: int) -> int:
    """Chunks and questions of the collection (the vectors a reindex makes); CollectionGone
    when it was deleted."""
    found = conn.execute(
        "SELECT chunks + questions FROM collections WHERE id = ?", (collection_id,)
    ).fetchone()
    if found is None:
        raise CollectionGone("the collection of this reindex was deleted")
    return int(found[0])


def _begin(store: DocumentStore, collection_id: int, model: str, dimension: int) -> ReindexJob:
    """Resume the collection's stopped job for ``model`` or start a new one (writer thread)."""
    staged = store.begin()
    conn = staged.conn
    try:
        total = _keys_total(conn, collection_id)
        source = conn.execute(
            "SELECT embedding_model FROM collections WHERE id = ?", (collection_id,)
        ).fetchone()[0]
        latest = conn.execute(
            "SELECT id, embedding_model, dimension, state FROM reindex_jobs "
            "WHERE collection_id = ? ORDER BY id DESC LIMIT 1",
            (collection_id,),
        ).fetchone()
        now = time.time()
        last = None if latest is None else (latest[1], latest[2], latest[3])
        decision = decide_resume(last, model, dimension)
        if decision == "resume":
            job_id = int(latest[0])
            conn.execute(
                "UPDATE reindex_jobs SET state = 'running', error = NULL, total = ?, "
                "updated_at = ? WHERE id = ?",
                (total, now, job_id),
            )
        else:
            if decision == "replace":
                conn.execute(
                    "UPDATE reindex_jobs SET state = 'failed', error = ?, updated_at = ? "
                    "WHERE id = ?",
                    (f"replaced by a reindex to {model}", now, latest[0]),
                )
            conn.execute("DELETE FROM reindex_vectors WHERE collection_id = ?", (collection_id,))
            cur = conn.execute(
                "INSERT INTO reindex_jobs (collection_id, embedding_model, dimension, "
                "source_model, state, done, total, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 'running', 0, ?, ?, ?)",
                (collection_id, model, dimension, source, total, now, now),
            )
            job_id = int(cur.lastrowid or 0)
        job = _read_job(conn, job_id)
        staged.commit()
        return job
    except BaseException:
        staged.rollback()
        raise


def _pending(
    store: DocumentStore, collection_id: int, after: int, limit: int
) -> builtins.list[tuple[int, str]]:
    """Keys above ``after`` without a shadow vector, with their texts, chunks first."""
    rows = store.query(
        "SELECT c.id, c.text FROM chunks c WHERE c.collection_id = ? AND c.id > ? "
        "AND NOT EXISTS (SELECT 1 FROM reindex_vectors v WHERE v.key = c.id) "
        "ORDER BY c.id LIMIT ?",
        (collection_id, after, limit),
    )
    if len(rows) < limit:
        rows += store.query(
            "SELECT q.id + ?, q.text FROM questions q WHERE q.collection_id = ? AND q.id > ? "
            "AND NOT EXISTS (SELECT 1 FROM reindex_vectors v WHERE v.key = q.id + ?) "
            "ORDER BY q.id LIMIT ?",
            (
                QUESTION_ID_OFFSET,
                collection_id,
                max(after - QUESTION_ID_OFFSET, 0),
                QUESTION_ID_OFFSET,
                limit - len(rows),
            ),
        )
    return [(int(r[0]), str(r[1])) for r in rows]


def _store(
    store: DocumentStore, job: ReindexJob, keys: Sequence[int], vectors: np.ndarray
) -> ReindexJob:
    """Shadow vectors and the job's progress in one transaction (writer thread)."""
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    if vecs.shape != (len(keys), job.dimension):
        raise ValueError(f"{len(keys)} keys need vectors of shape ({len(keys)}, {job.dimension})")
    staged = store.begin()
    conn = staged.conn
    try:
        total = _keys_total(conn, job.collection_id)
        state = conn.execute("SELECT state FROM reindex_jobs WHERE id = ?", (job.id,)).fetchone()
        if state is None or state[0] != "running":
            raise ReindexRunning(f"the reindex of {job.collection!r} was replaced by another")
        conn.executemany(
            "INSERT OR REPLACE INTO reindex_vectors (key, collection_id, embedding) "
            "VALUES (?, ?, ?)",
            [(int(k), job.collection_id, v.tobytes()) for k, v in zip(keys, vecs, strict=True)],
        )
        conn.execute(
            "UPDATE reindex_jobs SET done = min(done + ?, ?), total = ?, updated_at = ? "
            "WHERE id = ?",
            (len(keys), total, total, time.time(), job.id),
        )
        updated = _read_job(conn, job.id)
        staged.commit()
        return updated
    except BaseException:
        staged.rollback()
        raise


def _finish(store: DocumentStore, job_id: int, error: str) -> None:
    staged = store.begin()
    try:
        staged.conn.execute(
            "UPDATE reindex_jobs SET state = 'failed', error = ?, updated_at = ? "
            "WHERE id = ? AND state = 'running'",
            (error[:2000], time.time(), job_id),
        )
        staged.commit()
    except BaseException:
        staged.rollback()
        raise


class EmbeddedReindexer:
    """:class:`~indexes.reindex.Reindexer` of an :class:`~indexes.embedded.EmbeddedEngine`."""

    def __init__(self, engine: EmbeddedEngine) -> None:
        self._engine = engine
        self._claimed: set[int] = set()  # collection ids with a live runner in this process

    async def jobs(self) -> builtins.list[ReindexJob]:
        store = self._engine.store
        rows = await self._engine.read(
            store.query,
            f"{_JOBS} WHERE j.id IN (SELECT max(id) FROM reindex_jobs GROUP BY collection_id) "
            "ORDER BY c.name",
        )
        return [ReindexJob.from_row(r) for r in rows]

    async def start(self, name: str, embedding_model: str, dimension: int) -> EmbeddedClaim:
        collection = self._engine.get(name)
        cid = collection.row.id
        if cid in self._claimed:
            raise ReindexRunning(f"collection {name!r} is being reindexed already")
        self._claimed.add(cid)
        try:
            job = await self._engine.write(
                lambda: _begin(self._engine.store, cid, embedding_model, dimension)
            )
        except BaseException:
            self._claimed.discard(cid)
            raise
        return EmbeddedClaim(self, collection, job)

    async def stalled(self) -> builtins.list[EmbeddedClaim]:
        claims = []
        for job in await self.jobs():
            if job.state != "running" or job.collection_id in self._claimed:
                continue
            collection = self._engine.find(job.collection)
            if collection is None or collection.row.id != job.collection_id:
                continue
            self._claimed.add(job.collection_id)
            claims.append(EmbeddedClaim(self, collection, job))
        return claims

    def _release(self, collection_id: int) -> None:
        self._claimed.discard(collection_id)


class EmbeddedClaim:
    """A claimed job of the embedded engine (:class:`~indexes.reindex.ReindexClaim`)."""

    def __init__(
        self, owner: EmbeddedReindexer, collection: EmbeddedCollection, job: ReindexJob
    ) -> None:
        self._owner = owner
        self._engine = owner._engine
        self._collection = collection
        self._job = job

    @property
    def job(self) -> ReindexJob:
        return self._job

    async def pending(self, after: int, limit: int) -> builtins.list[tuple[int, str]]:
        return await self._engine.read(
            _pending, self._engine.store, self._job.collection_id, after, limit
        )

    async def store(self, keys: Sequence[int], vectors: np.ndarray) -> ReindexJob:
        job = self._job
        self._job = await self._engine.write(lambda: _store(self._engine.store, job, keys, vectors))
        return self._job

    async def fail(self, error: str) -> None:
        job_id = self._job.id
        await self._engine.write(lambda: _finish(self._engine.store, job_id, error))
        self._job = replace(self._job, state="failed", error=error)

    async def release(self) -> None:
        self._owner._release(self._job.collection_id)

    async def swap(self, embed: Embed) -> CollectionRow:
        engine, collection = self._engine, self._collection
        job = self._job
        target = replace(
            collection.row, embedding_model=job.embedding_model, dimension=job.dimension
        )
        # While writes go on: what the sweeps left, then the new index from the shadow
        # vectors (minutes for a large HNSW index), then what writes did meanwhile.
        await catch_up(self, embed)
        index = await asyncio.to_thread(engine.new_index, target)
        await engine.read(lambda: self._sync(index, complete=False))
        for _ in range(CATCH_UP_ROUNDS):
            caught = await catch_up(self, embed)
            changed = await engine.read(lambda: self._sync(index, complete=False))
            if caught + changed == 0:
                break
        async with collection.writer:  # writers wait for the small rest and the commit
            if engine.find(collection.name) is not collection:
                raise CollectionGone(f"collection {collection.name!r} was deleted")
            await catch_up(self, embed)
            await engine.read(lambda: self._sync(index, complete=True))
            job = self._job
            row = replace(
                collection.row, embedding_model=job.embedding_model, dimension=job.dimension
            )
            store = engine.store

            def apply() -> None:
                staged = store.begin()
                conn = staged.conn
                try:
                    total = _keys_total(conn, job.collection_id)
                    cid = job.collection_id
                    conn.execute(
                        "UPDATE chunks SET embedding = (SELECT v.embedding FROM reindex_vectors v "
                        "WHERE v.key = chunks.id) WHERE collection_id = ?",
                        (cid,),
                    )
                    conn.execute(
                        "UPDATE questions SET embedding = (SELECT v.embedding FROM "
                        "reindex_vectors v WHERE v.key = questions.id + ?) WHERE collection_id = ?",
                        (QUESTION_ID_OFFSET, cid),
                    )
                    conn.execute(
                        "UPDATE collections SET embedding_model = ?, dimension = ? WHERE id = ?",
                        (job.embedding_model, job.dimension, cid),
                    )
                    conn.execute("DELETE FROM reindex_vectors WHERE collection_id = ?", (cid,))
                    conn.execute(
                        "UPDATE reindex_jobs SET state = 'done', done = ?, total = ?, "
                        "error = NULL, updated_at = ? WHERE id = ?",
                        (total, total, time.time(), job.id),
                    )
                    with collection.lock.write():
                        staged.commit()
                        collection.index = index
                        collection._row = row
                        collection.incompatible = None
                except BaseException:
                    staged.rollback()
                    raise
                self._job = replace(job, state="done", done=total, total=total)

            await engine.write(apply)
            collection._changed()
        return row

    def _sync(self, index: FaissIndex, *, complete: bool) -> int:
        """Bring the new model's ``index`` (still private to this swap) to the collection's
        chunks and questions as stored now, from their shadow vectors: keys gone are removed,
        keys new to it are added; how many changed (blocking). A key without a shadow vector
        yet is left for the next pass, or, when ``complete`` (writers held off, catch-up
        done), is a :class:`~indexes.engine.StorageError`."""
        store = self._engine.store
        job = self._job
        cid = job.collection_id
        stored = np.concatenate([store.chunk_ids(cid), store.question_vector_ids(cid)])
        present = index.ids()
        gone = np.setdiff1d(present, stored, assume_unique=True)
        missing = np.setdiff1d(stored, present, assume_unique=True)
        index.remove(gone)
        added = 0
        for start in range(0, len(missing), _SQL_VARS):
            part = missing[start : start + _SQL_VARS].tolist()
            rows = store.query(
                "SELECT key, embedding FROM reindex_vectors "
                f"WHERE key IN ({','.join('?' * len(part))})",
                part,
            )
            if complete and len(rows) != len(part):
                raise StorageError(
                    f"{len(part) - len(rows)} vectors of {job.embedding_model} are missing "
                    f"from the reindex of {job.collection!r}"
                )
            if rows:
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
                index.add(ids, vectors.reshape(len(rows), job.dimension))
                added += len(rows)
        return added + len(gone)
