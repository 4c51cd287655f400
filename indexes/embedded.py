"""The embedded storage engine: SQLite (WAL + FTS5) as the source of truth, FAISS in memory.

One process owns the data directory: ``rag.sqlite3`` holds collections, documents and chunks
(with their embeddings), ``indexes/<id>.faiss`` + ``.json`` are index snapshots.

* Each :class:`EmbeddedCollection` owns its consistency: a write lock that serialises its
  upserts, a readers-writer lock between searches and index updates, its FAISS index, the
  dirty flag for the next snapshot, and rebuilds when deletions pile up as tombstones.
* An upsert is one SQLite transaction; under the collection's write lock it commits and then
  applies the delta to the index, so a reader sees either all of it or none. One writer thread
  applies every write (SQLite has one writer, and this keeps commits ordered).
* The index is derived state. On open every collection loads its snapshot (if it matches
  this embedding model and index type, and is readable at all) and reconciles with the store:
  ids the store has and the snapshot lacks are added from their stored embeddings, ids the
  snapshot has and the store lacks are removed. Nothing is re-embedded, and no acknowledged
  write is lost whatever moment the previous process died at.
* Search: metadata filter -> FAISS top-k restricted to the allowed ids (and BM25 for hybrid)
  -> rows from the store. A collection's known questions live in the same FAISS index under
  ids offset by :data:`~indexes.questions.QUESTION_ID_OFFSET` (snapshotted, restored and
  reconciled with the chunks); a question hit lifts its document's best chunk
  (:meth:`EmbeddedCollection._dense_ranking`). A lone small dense search runs on the event
  loop (cheaper than two thread hand-offs); others run on worker threads.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from indexes.docstore import DocumentStore
from indexes.engine import (
    CollectionGone,
    CollectionTaken,
    IndexUnusable,
    InvalidIndex,
    StoreBusy,
)
from indexes.faiss_index import FaissIndex, validate_factory, write_snapshot
from indexes.protocol import IndexMeta, IndexMismatchError
from indexes.questions import (
    QUESTION_ID_OFFSET,
    QuestionsOutcome,
    QuestionWrite,
    Ranking,
    is_question_key,
    lift_by_questions,
)
from indexes.reindex import ModelChanged
from indexes.rwlock import RWLock
from indexes.types import (
    CollectionOptions,
    CollectionRow,
    DocumentRow,
    DocumentWrite,
    ScoredHit,
    SearchQuery,
    WriteOutcome,
    fuse,
)

if TYPE_CHECKING:
    from indexes.reindex_embedded import EmbeddedReindexer

__all__ = ["EmbeddedCollection", "EmbeddedEngine", "RestoreReport"]

log = logging.getLogger(__name__)

T = TypeVar("T")
REBUILD_TOMBSTONE_FRACTION = 0.2


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


@contextlib.contextmanager
def _busy() -> Any:
    """SQLite's lock wait ran out: the store is busy, not broken."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise StoreBusy(f"the document store is busy: {exc}") from exc
        raise


@dataclass(slots=True)
class RestoreReport:
    collection: str
    from_snapshot: int = 0
    added_from_store: int = 0
    removed_stale: int = 0
    seconds: float = 0.0
    snapshot_error: str | None = None


class EmbeddedCollection:
    """One live collection of the embedded engine."""

    def __init__(
        self,
        engine: EmbeddedEngine,
        row: CollectionRow,
        index: FaissIndex | None,
        *,
        incompatible: str | None = None,
    ) -> None:
        self._engine = engine
        self._row = row
        self.index = index
        self.incompatible = incompatible
        self.lock = RWLock()  # searches vs index updates
        self.writer = asyncio.Lock()  # one upsert, delete or rebuild at a time
        self.dirty = False
        # Question vectors in the index: only steers how deep a dense search first fetches.
        self.question_keys = row.questions

    # ---- state -----------------------------------------------------------------------
    @property
    def row(self) -> CollectionRow:
        return self._row

    @property
    def name(self) -> str:
        return self._row.name

    def usable_index(self) -> FaissIndex:
        if self.incompatible is not None or self.index is None:
            raise IndexUnusable(self.incompatible or "index unavailable")
        return self.index

    def _alive(self) -> None:
        if self._engine.find(self.name) is not self:
            raise CollectionGone(f"collection {self.name!r} was deleted")

    def _check_model(self, model: str | None) -> None:
        """ModelChanged when vectors made by ``model`` no longer fit (a reindex swapped);
        called under the writer lock (writes) or the read lock (searches)."""
        if model is not None and model != self._row.embedding_model:
            raise ModelChanged(
                f"collection {self.name!r} is embedded with {self._row.embedding_model} now, "
                f"not {model}"
            )

    # ---- reads -----------------------------------------------------------------------
    async def existing(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        return await self._engine.read(self._engine.store.existing, self._row.id, list(ids))

    async def get(self, doc_id: str) -> DocumentRow | None:
        return await self._engine.read(self._engine.store.get_document, self._row.id, doc_id)

    async def texts(self, ids: Sequence[str]) -> dict[str, str]:
        """``{id: text}`` of those of ``ids`` stored, in one read (:class:`DocumentTexts`)."""
        return await self._engine.read(self._engine.store.document_texts, self._row.id, list(ids))

    async def list(
        self, *, limit: int, after: str | None, prefix: str = ""
    ) -> tuple[builtins.list[DocumentRow], bool]:
        store = self._engine.store
        return await self._engine.read(
            lambda: store.list_documents(self._row.id, limit=limit, after=after, prefix=prefix)
        )

    async def questions(self, ids: Sequence[str]) -> dict[str, builtins.list[str]]:
        return await self._engine.read(self._engine.store.questions_of, self._row.id, list(ids))

    async def add_questions(
        self, writes: Sequence[QuestionWrite], *, limit: int, model: str | None = None
    ) -> QuestionsOutcome:
        self.usable_index()
        async with self.writer:
            self._alive()
            self._check_model(model)
            index = self.usable_index()

            def apply() -> QuestionsOutcome:
                staged, outcome = self._engine.store.stage_add_questions(
                    self._row.id, writes, limit
                )
                if not outcome.written:
                    return outcome
                try:
                    with self.lock.write():
                        staged.commit()
                        if staged.added_ids:
                            index.add(np.asarray(staged.added_ids, np.int64), staged.vectors)
                        self.question_keys += staged.question_delta
                except BaseException:
                    staged.rollback()
                    raise
                return outcome

            outcome = await self._engine.write(apply)
            if outcome.written and any(outcome.added.values()):
                self._changed()
            return outcome

    # ---- writes ----------------------------------------------------------------------
    async def upsert(
        self, writes: Sequence[DocumentWrite], *, model: str | None = None
    ) -> WriteOutcome:
        self.usable_index()
        async with self.writer:
            self._alive()
            self._check_model(model)
            index = self.usable_index()

            def apply() -> WriteOutcome:
                staged, _ = self._engine.store.stage_upsert(self._row, None, writes)
                try:
                    with self.lock.write():
                        staged.commit()
                        index.remove(np.asarray(staged.removed, np.int64))
                        if staged.added_ids:
                            index.add(np.asarray(staged.added_ids, np.int64), staged.vectors)
                        self.question_keys += staged.question_delta
                except BaseException:
                    staged.rollback()
                    raise
                return WriteOutcome(staged.statuses, staged.chunk_counts)

            outcome = await self._engine.write(apply)
            self._changed()
            return outcome

    async def delete(self, doc_id: str) -> bool:
        self.usable_index()
        async with self.writer:
            self._alive()
            index = self.usable_index()

            def apply() -> bool:
                staged = self._engine.store.stage_delete(self._row.id, doc_id)
                if staged is None:
                    return False
                try:
                    with self.lock.write():
                        staged.commit()
                        index.remove(np.asarray(staged.removed, np.int64))
                        self.question_keys += staged.question_delta
                except BaseException:
                    staged.rollback()
                    raise
                return True

            deleted = await self._engine.write(apply)
            if deleted:
                self._changed()
            return bool(deleted)

    def _changed(self) -> None:
        self.dirty = True
        self._engine.observe_size(self.name, len(self.index or ()))

    # ---- search ----------------------------------------------------------------------
    async def search(
        self, query: SearchQuery, timings: dict[str, float] | None = None
    ) -> builtins.list[ScoredHit]:
        self.usable_index()
        timings = {} if timings is None else timings
        hits = self._search_inline(query, timings) if query.alone else None
        if hits is None:
            hits = await asyncio.to_thread(self._search_blocking, query, timings)
        return hits

    def _search_inline(
        self, query: SearchQuery, timings: dict[str, float]
    ) -> builtins.list[ScoredHit] | None:
        """The search on the event loop when it is sure to be short (dense, unfiltered, a
        small index, no known questions, no writer holding or waiting for the collection);
        None: use a thread. Question keys rule it out: a question hit reads the store
        (its document, the document's chunk vectors) and may repeat the search deeper."""
        limit = self._engine.inline_search_max_vectors
        if query.mode != "dense" or query.filter is not None or limit == 0:
            return None
        with self.lock.read_nowait() as acquired:
            if not acquired or self.question_keys > 0 or len(self.usable_index()) > limit:
                return None
            with _busy():
                return self._search_locked(query, timings)

    def _search_blocking(
        self, query: SearchQuery, timings: dict[str, float]
    ) -> builtins.list[ScoredHit]:
        with self.lock.read(), _busy():
            return self._search_locked(query, timings)

    def _search_locked(
        self, query: SearchQuery, timings: dict[str, float]
    ) -> builtins.list[ScoredHit]:
        """Dense (or hybrid) ranking plus the chunk rows; the caller holds the read lock."""
        self._check_model(query.embedding_model)
        store = self._engine.store
        allowed = None
        if query.filter is not None:
            t = time.perf_counter()
            allowed = store.filtered_chunk_ids(self._row.id, query.filter)
            if self.question_keys:
                allowed = np.concatenate(
                    [allowed, store.filtered_question_ids(self._row.id, query.filter)]
                )
            timings["filter"] = _ms(t)
            if len(allowed) == 0:
                return []
        top_k, min_score = query.top_k, query.min_score
        depth = top_k if query.mode == "dense" else max(top_k * 4, 50)
        dense, lifted = self._dense_ranking(query, depth, allowed, timings)
        if min_score is not None:
            dense = [(cid, s) for cid, s in dense if s >= min_score]
        if query.mode == "hybrid":
            t = time.perf_counter()
            sparse = store.bm25(self._row.id, query.text, depth, query.filter)
            timings["bm25"] = _ms(t)
            fused, parts = fuse(dense, sparse, alpha=query.alpha, fusion=query.fusion)
            ranked = fused[:top_k]
        else:
            ranked = dense[:top_k]
            parts = {cid: {"dense": score} for cid, score in ranked}
        for cid, extra in lifted.items():
            if cid in parts:
                parts[cid].update(extra)
        t = time.perf_counter()
        rows = store.hydrate([cid for cid, _ in ranked])
        timings["hydrate"] = _ms(t)
        return [ScoredHit(rows[cid], score, parts[cid]) for cid, score in ranked if cid in rows]

    def _dense_ranking(
        self, query: SearchQuery, depth: int, allowed: np.ndarray | None, timings: dict[str, float]
    ) -> tuple[Ranking, dict[int, dict[str, float]]]:
        """The dense ranking ``depth`` deep, known questions included, and the debug parts of
        the chunks a question lifted (see :func:`~indexes.questions.lift_by_questions`).

        FAISS returns chunk and question vectors alike. A question hit stands for its
        document's best chunk (scored from the stored chunk vectors), so several hits can
        collapse into one result: while fewer than ``depth`` results remain and FAISS had
        more to give, the search is repeated twice as deep. Everything scoring above the
        deepest vector fetched was fetched, so the first ``depth`` results are exact.
        """
        index = self.usable_index()
        size = len(index)
        k = depth if self.question_keys <= 0 else max(min(2 * depth, size), depth)
        while True:
            t = time.perf_counter()
            scores, ids = index.search(query.vector, k, allowed)
            timings["dense"] = timings.get("dense", 0.0) + _ms(t)
            found = [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
            chunks = [(i, s) for i, s in found if not is_question_key(i)]
            if len(chunks) == len(found):
                return chunks[:depth], {}
            t = time.perf_counter()
            ranking, lifted = self._lift(found, chunks, query.vector)
            timings["questions"] = timings.get("questions", 0.0) + _ms(t)
            if len(ranking) >= depth or len(found) < k or k >= size:
                return ranking[:depth], lifted
            k = min(2 * k, size)

    def _lift(
        self, found: Ranking, chunks: Ranking, vector: np.ndarray
    ) -> tuple[Ranking, dict[int, dict[str, float]]]:
        store = self._engine.store
        hits = [(i, s) for i, s in found if is_question_key(i)]
        documents = store.question_documents([i for i, _ in hits])
        best_question: dict[int, float] = {}
        for qid, score in hits:  # best first: the first hit of a document is its best
            doc = documents.get(qid)
            if doc is not None:
                best_question.setdefault(doc, score)
        best = store.best_chunks(list(best_question), vector, self._row.dimension)
        return lift_by_questions(chunks, best_question, best)


class EmbeddedEngine:
    """SQLite + FAISS in one process; see the module docstring.

    Every collection records its own embedding model and dimension, and its index is built
    for them.
    """

    name = "embedded"

    def __init__(
        self,
        data_dir: Path,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 30_000,
        ef_search: int = 64,
        nprobe: int = 16,
        snapshot_interval_s: float = 30.0,
        inline_search_max_vectors: int = 4096,
        max_ivf_nlist: int = 65536,
        observe_size: Callable[[str, int | None], None] | None = None,
        store: DocumentStore | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self.ef_search = ef_search
        self.nprobe = nprobe
        self.snapshot_interval_s = snapshot_interval_s
        self.inline_search_max_vectors = inline_search_max_vectors
        self.max_ivf_nlist = max_ivf_nlist
        self._observe = observe_size
        self._store = store
        self._owns_store = store is None
        self.index_dir = self.data_dir / "indexes"
        self._collections: dict[str, EmbeddedCollection] = {}
        self._creation = asyncio.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._snapshot_task: asyncio.Task[None] | None = None
        self.reports: builtins.list[RestoreReport] = []

    # ---- lifecycle -------------------------------------------------------------------
    @property
    def store(self) -> DocumentStore:
        if self._store is None:
            raise RuntimeError("EmbeddedEngine.open() was not called")
        return self._store

    async def open(self) -> None:
        if self._store is None:
            self._store = await asyncio.to_thread(
                DocumentStore,
                self.data_dir / "rag.sqlite3",
                synchronous=self.synchronous,
                busy_timeout_ms=self.busy_timeout_ms,
            )
        await asyncio.to_thread(self.restore_all)
        self._snapshot_task = asyncio.create_task(self._run_snapshots(), name="snapshots")

    async def close(self) -> None:
        if self._snapshot_task is not None:
            self._snapshot_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._snapshot_task
            self._snapshot_task = None
        if self._store is not None:
            await asyncio.to_thread(self.snapshot_all)
        self._writer.shutdown(wait=True)
        if self._owns_store and self._store is not None:
            self._store.close()

    async def write(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the one writer thread (SQLite has one writer; commits stay ordered)."""
        loop = asyncio.get_running_loop()

        def run() -> T:
            with _busy():
                return fn()

        return await loop.run_in_executor(self._writer, run)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        def run() -> T:
            with _busy():
                return fn(*args)

        return await asyncio.to_thread(run)

    def observe_size(self, name: str, size: int | None) -> None:
        if self._observe is not None:
            self._observe(name, size)

    @cached_property
    def reindexer(self) -> EmbeddedReindexer:
        """Moves collections to another embedding model (:mod:`indexes.reindex_embedded`)."""
        from indexes.reindex_embedded import EmbeddedReindexer

        return EmbeddedReindexer(self)

    # ---- collections -----------------------------------------------------------------
    def check_index(self, index: str, dimension: int) -> None:
        validate_factory(index, dimension, max_nlist=self.max_ivf_nlist)

    def find(self, name: str) -> EmbeddedCollection | None:
        return self._collections.get(name)

    async def lookup(self, name: str) -> EmbeddedCollection | None:
        return self._collections.get(name)  # one process: what it holds is all there is

    def get(self, name: str) -> EmbeddedCollection:
        found = self._collections.get(name)
        if found is None:
            raise CollectionGone(f"collection {name!r} does not exist")
        return found

    def meta_for(self, row: CollectionRow) -> IndexMeta:
        return IndexMeta(
            embedding_model=row.embedding_model, dimension=row.dimension, factory=row.index_factory
        )

    def new_index(self, row: CollectionRow) -> FaissIndex:
        try:
            return FaissIndex(self.meta_for(row), ef_search=self.ef_search, nprobe=self.nprobe)
        except RuntimeError as exc:  # FAISS's own refusal, past the grammar check
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
            raise InvalidIndex(f"FAISS cannot build index {row.index_factory!r}: {first}") from exc

    def _register(self, row: CollectionRow, index: FaissIndex) -> EmbeddedCollection:
        collection = EmbeddedCollection(self, row, index)
        self._collections[row.name] = collection
        self.observe_size(row.name, len(index))
        return collection

    async def create(self, options: CollectionOptions) -> EmbeddedCollection:
        async with self._creation:
            if options.name in self._collections:
                raise CollectionTaken(f"collection {options.name!r} already exists")
            # Built once, off the event loop, before anything is written: a factory FAISS
            # refuses leaves no row behind.
            index = await asyncio.to_thread(self.new_index, CollectionRow.of(options))
            row = await self.write(lambda: self.store.create_collection(options))
            if row is None:
                raise CollectionTaken(f"collection {options.name!r} already exists")
            return self._register(row, index)

    async def upsert_new(
        self, options: CollectionOptions, writes: Sequence[DocumentWrite]
    ) -> tuple[EmbeddedCollection, WriteOutcome]:
        existing = self.find(options.name)
        if existing is None:
            async with self._creation:
                existing = self.find(options.name)
                if existing is None:
                    return await self._create_with(options, writes)
        return existing, await existing.upsert(writes, model=options.embedding_model)

    async def _create_with(
        self, options: CollectionOptions, writes: Sequence[DocumentWrite]
    ) -> tuple[EmbeddedCollection, WriteOutcome]:
        index = await asyncio.to_thread(self.new_index, CollectionRow.of(options))

        def apply() -> tuple[CollectionRow, WriteOutcome]:
            staged, row = self.store.stage_upsert(None, options, writes)
            try:
                staged.commit()
            except BaseException:
                staged.rollback()
                raise
            index.remove(np.asarray(staged.removed, np.int64))
            index.add(np.asarray(staged.added_ids, np.int64), staged.vectors)
            return row, WriteOutcome(staged.statuses, staged.chunk_counts)

        row, outcome = await self.write(apply)
        collection = self._register(row, index)
        collection.question_keys = int(np.count_nonzero(index.ids() >= QUESTION_ID_OFFSET))
        collection.dirty = True
        return collection, outcome

    async def drop(self, name: str) -> None:
        collection = self.get(name)
        async with collection.writer:
            if self._collections.get(name) is not collection:
                raise CollectionGone(f"collection {name!r} does not exist")
            await self.write(lambda: self.store.delete_collection(collection.row.id))
            with collection.lock.write():
                self._collections.pop(name, None)
                self.observe_size(name, None)
                for path in self.snapshot_paths(collection.row):
                    path.unlink(missing_ok=True)

    async def configure(self, name: str, search: dict[str, Any]) -> CollectionRow:
        collection = self.get(name)
        async with collection.writer:
            row = await self.write(lambda: self.store.set_search_defaults(name, search))
            if row is None or self._collections.get(name) is not collection:
                raise CollectionGone(f"collection {name!r} does not exist")
            collection._row = replace(collection.row, search=row.search)
            return collection.row

    async def list(self) -> builtins.list[CollectionRow]:
        return await self.read(self.store.list_collections)

    # ---- restore ---------------------------------------------------------------------
    def restore_all(self) -> builtins.list[RestoreReport]:
        """Blocking: load every collection's index (call from a worker thread). One
        collection that cannot be restored is marked unusable; the others still load. Each
        collection records its own embedding model: whether this service can embed for it is
        the service's question (a collection of a model it cannot load is refused there)."""
        self.reports = []
        for row in self.store.list_collections():
            try:
                index, report = self.restore(row)
            except Exception as exc:  # one collection never blocks the others
                msg = f"collection {row.name!r} could not be restored: {exc}"
                log.exception(msg)
                self._collections[row.name] = EmbeddedCollection(self, row, None, incompatible=msg)
                continue
            collection = self._register(row, index)
            # A snapshot that needed repair (or none at all) is rewritten at the next round.
            collection.dirty = bool(
                report.added_from_store or report.removed_stale or report.snapshot_error
            )
            self.reports.append(report)
        return self.reports

    def restore(self, row: CollectionRow) -> tuple[FaissIndex, RestoreReport]:
        started = time.perf_counter()
        report = RestoreReport(row.name)
        path, _ = self.snapshot_paths(row)
        index: FaissIndex | None = None
        if path.exists():
            try:
                index = FaissIndex.load(
                    path,
                    self.meta_for(row),
                    expected_vectors=row.chunks + row.questions,
                    ef_search=self.ef_search,
                    nprobe=self.nprobe,
                )
                report.from_snapshot = len(index)
            except (IndexMismatchError, RuntimeError, OSError, ValueError, MemoryError) as exc:
                report.snapshot_error = str(exc)
                log.warning("ignoring snapshot of %r, rebuilding from the store: %s", row.name, exc)
        if index is None:
            index = self.new_index(row)
        report.added_from_store, report.removed_stale = self.reconcile(row, index)
        report.seconds = time.perf_counter() - started
        log.info(
            "collection %r: %d vectors from snapshot, %d added from store, %d stale removed, "
            "%.2fs, nothing re-embedded",
            row.name,
            report.from_snapshot,
            report.added_from_store,
            report.removed_stale,
            report.seconds,
        )
        return index, report

    def reconcile(self, row: CollectionRow, index: FaissIndex) -> tuple[int, int]:
        """Make ``index`` hold exactly the store's chunk and question ids; returns (added,
        removed)."""
        stored = np.concatenate(
            [self.store.chunk_ids(row.id), self.store.question_vector_ids(row.id)]
        )
        present = index.ids()
        extra = np.setdiff1d(present, stored, assume_unique=True)
        missing = np.setdiff1d(stored, present, assume_unique=True)
        index.remove(extra)
        questions = missing >= QUESTION_ID_OFFSET
        for ids, vectors in self.store.embeddings(missing[~questions].tolist(), row.dimension):
            index.add(ids, vectors)
        for ids, vectors in self.store.question_embeddings(
            missing[questions].tolist(), row.dimension
        ):
            index.add(ids, vectors)
        return len(missing), len(extra)

    # ---- snapshots -------------------------------------------------------------------
    def snapshot_paths(self, row: CollectionRow) -> tuple[Path, Path]:
        path = self.index_dir / f"{row.id}.faiss"
        return path, path.with_suffix(".json")

    def snapshot(self, collection: EmbeddedCollection) -> bool:
        """Blocking: write the collection's index to disk if it changed; True if written.

        The index, its record (model, dimension) and the row are read under one read lock: a
        reindex swaps index and row under the write lock, so the snapshot never labels one
        model's vectors with the other's name."""
        if collection.index is None or not collection.dirty:
            return False
        with collection.lock.read():
            index, row = collection.index, collection.row
            data = index.serialize()
            meta, staged = index.meta, index.staged
            collection.dirty = False
        if self._collections.get(row.name) is not collection:
            return False  # dropped meanwhile
        path, _ = self.snapshot_paths(row)
        write_snapshot(path, data, meta, staged=staged)
        return True

    def snapshot_all(self) -> int:
        return sum(self.snapshot(c) for c in list(self._collections.values()))

    def needs_rebuild(self, collection: EmbeddedCollection) -> bool:
        idx = collection.index
        return idx is not None and idx.tombstones > REBUILD_TOMBSTONE_FRACTION * max(len(idx), 1)

    async def rebuild(self, collection: EmbeddedCollection) -> None:
        """Rebuild an index that accumulated tombstones; writers wait, readers do not."""
        async with collection.writer:
            fresh = self.new_index(collection.row)
            await self.read(self.reconcile, collection.row, fresh)
            with collection.lock.write():
                collection.index = fresh
                collection.dirty = True

    async def _run_snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval_s)
            for collection in list(self._collections.values()):
                try:
                    if self.needs_rebuild(collection):
                        await self.rebuild(collection)
                    await asyncio.to_thread(self.snapshot, collection)
                except Exception:
                    log.exception("snapshot of %r failed; will retry", collection.name)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "collections": len(self._collections),
            "restore": [
                {
                    "collection": r.collection,
                    "from_snapshot": r.from_snapshot,
                    "added_from_store": r.added_from_store,
                    "removed_stale": r.removed_stale,
                    "seconds": round(r.seconds, 3),
                    "reembedded": 0,
                }
                for r in self.reports
            ],
        }
