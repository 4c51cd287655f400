"""Live collections: each one's FAISS index, its lock, restore on start and snapshots.

The index is derived state. On start every collection loads its snapshot (if its metadata
matches this embedding model and index type) and then reconciles with the document store: ids
the store has and the snapshot lacks are added from their stored embeddings, ids the snapshot
has and the store lacks are removed. Nothing is re-embedded, and no acknowledged write is lost
whatever moment the previous process died at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexes.docstore import CollectionRow, DocumentStore
from indexes.faiss_index import FaissIndex, write_snapshot
from indexes.protocol import IndexMeta, IndexMismatchError
from rag_service.errors import CollectionNotFound, EmbeddingMismatch
from rag_service.metrics import Metrics
from rag_service.rwlock import RWLock
from rag_service.settings import Settings

__all__ = ["CollectionRuntime", "Registry", "RestoreReport"]

log = logging.getLogger(__name__)

REBUILD_TOMBSTONE_FRACTION = 0.2


@dataclass(slots=True)
class RestoreReport:
    collection: str
    from_snapshot: int = 0
    added_from_store: int = 0
    removed_stale: int = 0
    seconds: float = 0.0
    snapshot_error: str | None = None


@dataclass(slots=True, eq=False)
class CollectionRuntime:
    row: CollectionRow
    index: FaissIndex | None
    incompatible: str | None = None
    lock: RWLock = field(default_factory=RWLock)
    writer: asyncio.Lock = field(default_factory=asyncio.Lock)
    dirty: bool = False
    version: int = 0

    def usable_index(self) -> FaissIndex:
        if self.incompatible is not None or self.index is None:
            raise EmbeddingMismatch(self.incompatible or "index unavailable", param="collection")
        return self.index


class Registry:
    def __init__(
        self,
        settings: Settings,
        store: DocumentStore,
        *,
        embedding_model: str,
        dimension: int,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.embedding_model = embedding_model
        self.dimension = dimension
        self.metrics = metrics
        self.index_dir = Path(settings.data_dir) / "indexes"
        self._runtimes: dict[str, CollectionRuntime] = {}
        self.creation_lock = asyncio.Lock()
        self.reports: list[RestoreReport] = []
        self._snapshot_task: asyncio.Task[None] | None = None

    # ---- lookup ------------------------------------------------------------------------
    def get(self, name: str) -> CollectionRuntime:
        rt = self._runtimes.get(name)
        if rt is None:
            raise CollectionNotFound(f"collection {name!r} does not exist", param="collection")
        return rt

    def find(self, name: str) -> CollectionRuntime | None:
        return self._runtimes.get(name)

    def names(self) -> list[str]:
        return sorted(self._runtimes)

    def meta_for(self, row: CollectionRow) -> IndexMeta:
        return IndexMeta(
            embedding_model=row.embedding_model, dimension=row.dimension, factory=row.index_factory
        )

    def new_index(self, row: CollectionRow) -> FaissIndex:
        return FaissIndex(
            self.meta_for(row),
            ef_search=self.settings.hnsw_ef_search,
            nprobe=self.settings.ivf_nprobe,
        )

    def register(self, row: CollectionRow, index: FaissIndex) -> CollectionRuntime:
        rt = CollectionRuntime(row=row, index=index)
        self._runtimes[row.name] = rt
        self.metrics.index_vectors.labels(row.name).set(len(index))
        return rt

    def unregister(self, name: str) -> CollectionRuntime | None:
        rt = self._runtimes.pop(name, None)
        if rt is not None:
            with contextlib.suppress(KeyError):
                self.metrics.index_vectors.remove(name)
            for path in self.snapshot_paths(rt.row):
                path.unlink(missing_ok=True)
        return rt

    def snapshot_paths(self, row: CollectionRow) -> tuple[Path, Path]:
        path = self.index_dir / f"{row.id}.faiss"
        return path, path.with_suffix(".json")

    # ---- restore -----------------------------------------------------------------------
    def restore_all(self) -> list[RestoreReport]:
        """Blocking: load every collection's index (call from a worker thread)."""
        self.reports = []
        for row in self.store.list_collections():
            if row.embedding_model != self.embedding_model or row.dimension != self.dimension:
                msg = (
                    f"collection {row.name!r} was embedded with {row.embedding_model} "
                    f"(dimension {row.dimension}) but this service runs {self.embedding_model} "
                    f"(dimension {self.dimension}); serve it with RAG_EMBEDDING_MODEL set to "
                    "that model, or re-create the collection"
                )
                log.error(msg)
                self._runtimes[row.name] = CollectionRuntime(row=row, index=None, incompatible=msg)
                continue
            index, report = self.restore(row)
            rt = self.register(row, index)
            # A snapshot that needed repair (or none at all) is rewritten at the next round.
            rt.dirty = bool(
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
                    ef_search=self.settings.hnsw_ef_search,
                    nprobe=self.settings.ivf_nprobe,
                )
                report.from_snapshot = len(index)
            except (IndexMismatchError, RuntimeError, OSError) as exc:
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
        """Make ``index`` hold exactly the store's chunk ids; returns (added, removed)."""
        stored = self.store.chunk_ids(row.id)
        present = index.ids()
        extra = np.setdiff1d(present, stored, assume_unique=True)
        missing = np.setdiff1d(stored, present, assume_unique=True)
        index.remove(extra)
        for ids, vectors in self.store.embeddings(missing.tolist(), row.dimension):
            index.add(ids, vectors)
        return len(missing), len(extra)

    # ---- snapshots -----------------------------------------------------------------------
    def snapshot(self, rt: CollectionRuntime) -> bool:
        """Blocking: write ``rt``'s index to disk if it changed. Returns True if written."""
        if rt.index is None or not rt.dirty:
            return False
        with rt.lock.read():
            data = rt.index.serialize()
            staged = rt.index._staging is not None
            rt.dirty = False
        if self._runtimes.get(rt.row.name) is not rt:
            return False  # dropped meanwhile
        path, _ = self.snapshot_paths(rt.row)
        write_snapshot(path, data, rt.index.meta, staged=staged)
        return True

    def snapshot_all(self) -> int:
        return sum(self.snapshot(rt) for rt in list(self._runtimes.values()))

    def needs_rebuild(self, rt: CollectionRuntime) -> bool:
        idx = rt.index
        return idx is not None and idx.tombstones > REBUILD_TOMBSTONE_FRACTION * max(len(idx), 1)

    async def rebuild(self, rt: CollectionRuntime) -> None:
        """Rebuild an index that accumulated tombstones; writers wait, readers do not."""
        async with rt.writer:
            fresh = self.new_index(rt.row)
            await asyncio.to_thread(self.reconcile, rt.row, fresh)
            with rt.lock.write():
                rt.index = fresh
                rt.dirty = True

    async def run_snapshots(self) -> None:
        interval = self.settings.snapshot_interval_s
        while True:
            await asyncio.sleep(interval)
            for rt in list(self._runtimes.values()):
                try:
                    if self.needs_rebuild(rt):
                        await self.rebuild(rt)
                    await asyncio.to_thread(self.snapshot, rt)
                except Exception:
                    log.exception("snapshot of %r failed; will retry", rt.row.name)

    def start_snapshots(self) -> None:
        self._snapshot_task = asyncio.create_task(self.run_snapshots(), name="snapshots")

    async def stop_snapshots(self) -> None:
        if self._snapshot_task is not None:
            self._snapshot_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._snapshot_task
        await asyncio.to_thread(self.snapshot_all)

    def describe(self) -> dict[str, Any]:
        return {
            "collections": len(self._runtimes),
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
