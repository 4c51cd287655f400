"""Dynamic micro-batching of embedding requests.

Concurrent callers put texts in a queue; a worker takes up to ``max_batch_size`` texts (or
``max_batch_tokens`` tokens) at a time and encodes them on its own thread, so batches form
instead of threads fighting over the cores. A request that finds its lane idle is encoded at
once: no request ever waits for company. Batches form only from what arrives while the
encoder is busy, and the next batch starts the moment the previous one ends (the way
text-embeddings-inference batches); under load the batches grow by themselves, since every
request that lands during a forward pass joins the next one (benchmarks/bench_onnx.py reruns
B1, 64 clients, to show throughput holds).

Two lanes, each with its own queue, worker and thread:

* ``interactive`` (search queries, /v1/embeddings): bounded; past ``max_queue`` waiting texts
  a request fails fast with :class:`~rag_service.errors.Overloaded` (HTTP 503 + Retry-After).
* ``bulk`` (document ingest): flow-controlled instead of bounded; callers submit one batch at a
  time and wait, and batches are capped at ``max_bulk_tokens`` so a forward pass stays short.

A query never waits behind an ingest batch: the lanes encode side by side on the same model
(measured in benchmarks/bench_search.py, B4).

The batcher is generic over what it batches: items (texts, or the reranker's (query, text)
pairs) go in, and the batch function returns one row per item (a vector, or a score). A second
batcher can run its lanes on the threads of another (``executors``): the reranker's batches
take turns with the query embeddings on the one interactive thread instead of running beside
them (:mod:`rag_service.reranking`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

import numpy as np

from rag_service.errors import Overloaded

__all__ = ["BatchObserver", "Encoder", "Lane", "MicroBatcher"]

log = logging.getLogger(__name__)

Lane = Literal["interactive", "bulk"]
LANES: tuple[Lane, ...] = ("interactive", "bulk")
Item = TypeVar("Item")
Encoder = Callable[[list[str], list[int]], np.ndarray]


class BatchObserver(Protocol):
    def batch_done(self, size: int, tokens: int, seconds: float) -> None: ...
    def queue_depth(self, depth: int) -> None: ...


@dataclass(slots=True, eq=False)
class _Request(Generic[Item]):
    texts: Sequence[Item]
    tokens: Sequence[int]
    future: asyncio.Future[np.ndarray]
    rows: list[np.ndarray | None] = field(default_factory=list)
    next_index: int = 0  # first text not yet handed to a batch
    remaining: int = 0  # texts not yet encoded

    def __post_init__(self) -> None:
        self.rows = [None] * len(self.texts)
        self.remaining = len(self.texts)


class _Lane(Generic[Item]):
    def __init__(
        self,
        name: Lane,
        encode: Callable[[list[Item], list[int]], np.ndarray],
        max_size: int,
        max_tokens: int,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.name = name
        self.encode = encode
        self.max_size = max_size
        self.max_tokens = max_tokens
        self.queue: deque[_Request[Item]] = deque()
        self.waiting = 0
        self.wakeup = asyncio.Event()
        self.owns_executor = executor is None  # a borrowed one is shut down by its owner
        self.executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"embed-{name}"
        )
        self.task: asyncio.Task[None] | None = None


class MicroBatcher(Generic[Item]):
    def __init__(
        self,
        encode: Callable[[list[Item], list[int]], np.ndarray],
        *,
        encode_bulk: Callable[[list[Item], list[int]], np.ndarray] | None = None,
        max_batch_size: int = 64,
        max_batch_tokens: int = 16384,
        max_bulk_tokens: int = 4096,
        max_queue: int = 2048,
        observer: BatchObserver | None = None,
        executors: Mapping[Lane, ThreadPoolExecutor] | None = None,
        kind: str = "embedding",
    ) -> None:
        """``executors``: run these lanes' batches on another batcher's threads (see
        :attr:`executors`); ``kind`` names the work in errors and logs."""
        self.kind = kind
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._observer = observer
        shared = executors or {}
        self._lanes: dict[Lane, _Lane[Item]] = {
            "interactive": _Lane(
                "interactive", encode, max_batch_size, max_batch_tokens, shared.get("interactive")
            ),
            "bulk": _Lane(
                "bulk",
                encode_bulk or encode,
                max_batch_size,
                min(max_bulk_tokens, max_batch_tokens),
                shared.get("bulk"),
            ),
        }
        self._bulk_gate = asyncio.Semaphore(2)

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        for lane in self._lanes.values():
            if lane.task is None:
                lane.task = asyncio.create_task(self._run(lane), name=f"batcher-{lane.name}")

    async def stop(self) -> None:
        for lane in self._lanes.values():
            if lane.task is not None:
                lane.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
                lane.task = None
            for req in lane.queue:
                if not req.future.done():
                    req.future.set_exception(Overloaded(f"{self.kind} service is shutting down"))
            lane.queue.clear()
            if lane.owns_executor:
                lane.executor.shutdown(wait=True, cancel_futures=True)

    @property
    def executors(self) -> dict[Lane, ThreadPoolExecutor]:
        """The thread of each lane, for a batcher that should take turns on them."""
        return {name: lane.executor for name, lane in self._lanes.items()}

    @property
    def queue_depth(self) -> int:
        return sum(lane.waiting for lane in self._lanes.values())

    # ---- submission ------------------------------------------------------------------
    async def embed(
        self, texts: Sequence[Item], tokens: Sequence[int], *, lane: Lane = "interactive"
    ) -> np.ndarray:
        """The batch function's rows for ``texts`` (``tokens`` = their token counts), in order:
        vectors for an embedding batcher, scores for the reranker's."""
        if not texts:
            raise ValueError("embed() needs at least one text")
        if lane == "bulk":
            parts = []
            step = self.max_batch_size
            for i in range(0, len(texts), step):
                async with self._bulk_gate:
                    parts.append(
                        await self._submit(
                            self._lanes["bulk"], texts[i : i + step], tokens[i : i + step]
                        )
                    )
            return np.concatenate(parts) if len(parts) > 1 else parts[0]
        interactive = self._lanes["interactive"]
        if interactive.waiting + len(texts) > self.max_queue:
            raise Overloaded(
                f"{self.kind} queue is full ({interactive.waiting} waiting); retry shortly",
                retry_after_s=1,
            )
        return await self._submit(interactive, texts, tokens)

    async def _submit(
        self, lane: _Lane[Item], texts: Sequence[Item], tokens: Sequence[int]
    ) -> np.ndarray:
        if lane.task is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        req: _Request[Item] = _Request(texts, tokens, future)
        lane.queue.append(req)
        lane.waiting += len(texts)
        self._report_depth()
        lane.wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away: drop whatever of it has not been handed to a batch.
            if req in lane.queue:
                lane.queue.remove(req)
                lane.waiting -= len(texts) - req.next_index
                self._report_depth()
            raise

    # ---- worker ----------------------------------------------------------------------
    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.queue_depth(self.queue_depth)

    @staticmethod
    def _take_batch(lane: _Lane[Item]) -> list[tuple[_Request[Item], int, int]]:
        """Slices (request, start, stop) forming the lane's next batch."""
        batch: list[tuple[_Request[Item], int, int]] = []
        size = tokens = 0
        while lane.queue and size < lane.max_size:
            req = lane.queue[0]
            start = stop = req.next_index
            while stop < len(req.texts) and size < lane.max_size:
                t = req.tokens[stop]
                if size and tokens + t > lane.max_tokens:
                    break
                size += 1
                tokens += t
                stop += 1
            if stop == start:
                break  # token budget exhausted
            batch.append((req, start, stop))
            req.next_index = stop
            lane.waiting -= stop - start
            if stop == len(req.texts):
                lane.queue.popleft()
            else:
                break
        return batch

    async def _run(self, lane: _Lane[Item]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not lane.waiting:
                lane.wakeup.clear()
                await lane.wakeup.wait()
            # No wait: what is queued now arrived while the previous batch encoded (or is a
            # request that found the lane idle, which goes alone and at once).
            batch = self._take_batch(lane)
            self._report_depth()
            if not batch:
                continue
            texts = [t for req, a, b in batch for t in req.texts[a:b]]
            tokens = [n for req, a, b in batch for n in req.tokens[a:b]]
            started = loop.time()

            def encode_and_deliver(
                batch: list[tuple[_Request[Item], int, int]] = batch,
                texts: list[Item] = texts,
                tokens: list[int] = tokens,
                started: float = started,
            ) -> None:
                # The worker thread hands the vectors straight to the waiting requests: they
                # resume one loop iteration sooner than if this task delivered them. The batch
                # is recorded first (callbacks run in order), so a caller that stops the
                # batcher once its results are in never loses the record of their batch.
                vectors = lane.encode(texts, tokens)
                if self._observer is not None:
                    loop.call_soon_threadsafe(
                        self._observer.batch_done, len(texts), sum(tokens), loop.time() - started
                    )
                loop.call_soon_threadsafe(self._deliver, batch, vectors)

            try:
                await loop.run_in_executor(lane.executor, encode_and_deliver)
            except Exception as exc:
                log.exception("%s batch of %d items failed", self.kind, len(texts))
                for req, _, _ in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)
                    if req in lane.queue:  # drop the rest of a failed request
                        lane.queue.remove(req)
                        lane.waiting -= len(req.texts) - req.next_index
                continue

    @staticmethod
    def _deliver(batch: list[tuple[_Request[Item], int, int]], vectors: np.ndarray) -> None:
        row = 0
        for req, a, b in batch:
            for i in range(a, b):
                req.rows[i] = vectors[row]
                row += 1
            req.remaining -= b - a
            if req.remaining == 0 and not req.future.done():
                req.future.set_result(np.stack(req.rows))  # type: ignore[arg-type]
