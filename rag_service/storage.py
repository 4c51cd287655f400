"""Which storage engine the service runs on, built from the settings.

``RAG_DATABASE_URL`` unset: the ``embedded`` engine (SQLite + FAISS under ``RAG_DATA_DIR``).
Set to ``postgresql://...``: the ``postgres`` engine (PostgreSQL + pgvector), shared by every
replica that points at the same database.
"""

from __future__ import annotations

from indexes.engine import Engine
from rag_service.metrics import Metrics
from rag_service.settings import Settings

__all__ = ["make_engine"]


def make_engine(settings: Settings, metrics: Metrics) -> Engine:
    def observe_size(name: str, size: int | None) -> None:
        if size is not None:
            metrics.index_vectors.labels(name).set(size)
        elif name in _labels(metrics):
            metrics.index_vectors.remove(name)

    if settings.database_url:
        from indexes.postgres import PostgresEngine

        return PostgresEngine(
            settings.database_url,
            ef_search=settings.hnsw_ef_search,
            pool_max=settings.database_pool_size,
        )
    from indexes.embedded import EmbeddedEngine

    return EmbeddedEngine(
        settings.data_dir,
        synchronous=settings.sqlite_synchronous,
        busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        ef_search=settings.hnsw_ef_search,
        nprobe=settings.ivf_nprobe,
        snapshot_interval_s=settings.snapshot_interval_s,
        inline_search_max_vectors=settings.inline_search_max_vectors,
        max_ivf_nlist=settings.max_ivf_nlist,
        observe_size=observe_size,
    )


def _labels(metrics: Metrics) -> set[str]:
    return {s.labels["collection"] for m in metrics.index_vectors.collect() for s in m.samples}
