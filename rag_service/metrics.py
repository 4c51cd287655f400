"""Prometheus metrics of one app instance (own registry, so several apps can coexist)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["BatchHistograms", "Metrics"]

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class BatchHistograms:
    """A :class:`~rag_service.batching.BatchObserver` of a batcher other than the embedding
    one (the reranker's): its batch sizes, durations and queue under a ``prefix``."""

    def __init__(self, registry: CollectorRegistry, prefix: str, what: str) -> None:
        self.size = Histogram(
            f"{prefix}_batch_size",
            f"{what} per batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.tokens = Histogram(
            f"{prefix}_batch_tokens",
            "Tokens per batch (estimated)",
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536),
            registry=registry,
        )
        self.seconds = Histogram(
            f"{prefix}_batch_seconds",
            "Time to run one batch",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue = Gauge(f"{prefix}_queue_depth", f"{what} waiting", registry=registry)

    def batch_done(self, size: int, tokens: int, seconds: float) -> None:
        self.size.observe(size)
        self.tokens.observe(tokens)
        self.seconds.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self.queue.set(depth)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http_latency = Histogram(
            "rag_http_request_duration_seconds",
            "HTTP request latency by route",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rag_embedding_batch_size",
            "Texts per embedding batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_tokens = Histogram(
            "rag_embedding_batch_tokens",
            "Tokens per embedding batch",
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "rag_embedding_batch_seconds",
            "Time to encode one batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge("rag_embedding_queue_depth", "Texts waiting for embedding", registry=r)
        self.generation_batch_size = Histogram(
            "rag_generation_batch_size",
            "Chat requests the local model generated together in one batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.index_vectors = Gauge(
            "rag_index_vectors", "Vectors in each collection's index", ["collection"], registry=r
        )
        self.documents = Counter(
            "rag_documents_upserted_total", "Upserted documents by status", ["status"], registry=r
        )
        self.chunks_embedded = Counter(
            "rag_chunks_embedded_total", "Chunks embedded on ingest", registry=r
        )
        self.search_latency = Histogram(
            "rag_search_duration_seconds",
            "Search latency inside the service by mode",
            ["mode"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rerank_batches = BatchHistograms(r, "rag_rerank", "(query, chunk) pairs")

        self.loop_lag = Histogram(
            "rag_event_loop_lag_seconds",
            "How late the event loop ran a 10 ms timer",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "rag_event_loop_lag_max_seconds",
            "Largest event-loop lag seen since the service became ready",
            registry=r,
        )
        self._worst_lag = 0.0
        self._lag_epoch = 0

    def reset_loop_lag_max(self) -> None:
        """Forget the worst lag so far (called once the service is ready: start-up imports
        and model loading are not request-time stalls). A sample in flight is dropped too,
        as it may span the start-up work."""
        self._worst_lag = 0.0
        self._lag_epoch += 1
        self.loop_lag_max.set(0.0)

    async def watch_event_loop(self, interval: float = 0.01) -> None:
        """Run forever: record how late the loop wakes from a short sleep (a stall detector)."""
        self._worst_lag = 0.0
        while True:
            epoch = self._lag_epoch
            started = time.perf_counter()  # uvloop's loop.time() has millisecond resolution
            await asyncio.sleep(interval)
            lag = max(0.0, time.perf_counter() - started - interval)
            if epoch != self._lag_epoch:
                continue
            self.loop_lag.observe(lag)
            if lag > self._worst_lag:
                self._worst_lag = lag
                self.loop_lag_max.set(lag)

    # BatchObserver
    def batch_done(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self.queue.set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
