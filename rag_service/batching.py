"""Dynamic micro-batching of embedding requests, on two lanes that share the cores.

Concurrent callers put texts in a queue; a worker takes up to ``max_batch_size`` texts (or
``max_batch_tokens`` tokens) at a time and encodes them on its lane's thread, so batches form
instead of threads fighting over the cores. A request that finds its lane idle is encoded at
once: no request ever waits for company. Batches form only from what arrives while the
encoder is busy, and the next batch starts the moment the previous one ends (the way
text-embeddings-inference batches); under load the batches grow by themselves, since every
request that lands during a forward pass joins the next one (benchmarks/bench_onnx.py reruns
B1, 64 clients, to show throughput holds).

Two lanes, each with its own queue, worker and thread (:class:`LaneThreads`):

* ``interactive`` (search queries, /v1/embeddings): bounded; past ``max_queue`` waiting texts
  a request fails fast with :class:`~rag_service.errors.Overloaded` (HTTP 503 + Retry-After).
* ``bulk`` (document ingest): flow-controlled instead of bounded; callers submit one batch at a
  time and wait, and batches are capped at ``max_bulk_tokens`` (the window within which
  chunks are sorted by length before they are cut into sub-batches).

Cores go to the work that exists. A lane that is alone encodes with every core; while both
lanes have work each runs on its share (:func:`lane_shares`: queries up to four threads, ingest
the rest), so a query never queues behind an ingest pass and two lanes never oversubscribe the
machine for long. The batch function is called with a ``threads`` callable and asks it before
each sub-batch (:mod:`rag_service.embedding` cuts bulk work into sub-batches of about a
thousand tokens), so an ingest gives up its extra cores within one short pass of a query
arriving and takes them back :data:`HOLD_S` after the last query ended (measured in
benchmarks/bench_b6.py: a shared pool of threads behind both lanes doubled query latency
under ingest; a fixed split left half the machine idle whenever one lane was alone).

The batcher is generic over what it batches: items (texts, token ids, or the reranker's
(query, text) pairs) go in, and the batch function returns one row per item (a vector, or a
score). A second batcher can run its lanes on the threads of another (``lanes``): the
reranker's batches and other embedding models take turns with the query embeddings on the
one interactive thread instead of running beside them (:mod:`rag_service.reranking`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

import numpy as np

from rag_service.errors import Overloaded

__all__ = [
    "HOLD_S",
    "BatchFn",
    "BatchObserver",
    "Lane",
    "LaneThreads",
    "MicroBatcher",
    "Threads",
    "available_cores",
    "lane_shares",
]

log = logging.getLogger(__name__)

Lane = Literal["interactive", "bulk"]
LANES: tuple[Lane, ...] = ("interactive", "bulk")
Item = TypeVar("Item")
Threads = Callable[[], int]
# The batch function: items, their token counts, and how many threads it may use right now
# (asked again before each sub-batch). One row per item.
BatchFn = Callable[[list[Item], list[int], Threads], np.ndarray]
# A lane counts as busy this long after its last batch ended, so that under steady search
# traffic an ingest keeps to its share instead of switching on every gap between queries.
HOLD_S = 0.05


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container started with ``--cpus=2`` on a large host sees every core but may use two)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, cores or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return cores


def lane_shares(cores: int) -> dict[Lane, int]:
    """Threads per lane while both lanes have work, adding up to the cores (at least one
    each): queries get up to four (a short query gains nothing from more), ingest the rest."""
    cores = max(1, cores)
    interactive = max(1, min(4, cores // 2))
    return {"interactive": interactive, "bulk": max(1, cores - interactive)}


class LaneThreads:
    """The two encoding threads of a service and the cores they share (see the module
    docstring). Every batcher of the process runs on one of these."""

    def __init__(self, cores: int | None = None, *, hold_s: float = HOLD_S) -> None:
        self.cores = available_cores() if cores is None else max(1, cores)
        self.shares = lane_shares(self.cores)
        self.hold_s = hold_s
        self.executors: dict[Lane, ThreadPoolExecutor] = {
            lane: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{lane}")
            for lane in LANES
        }
        self._lock = threading.Lock()
        self._working: dict[Lane, int] = dict.fromkeys(LANES, 0)
        self._ended: dict[Lane, float] = dict.fromkeys(LANES, -math.inf)

    @contextlib.contextmanager
    def working(self, lane: Lane) -> Iterator[None]:
        """Mark ``lane`` busy for the duration of a batch."""
        with self._lock:
            self._working[lane] += 1
        try:
            yield
        finally:
            with self._lock:
                self._working[lane] -= 1
                self._ended[lane] = time.monotonic()

    def busy(self, lane: Lane) -> bool:
        """Whether ``lane`` is encoding, or ended a batch less than ``hold_s`` ago."""
        return bool(self._working[lane]) or time.monotonic() - self._ended[lane] < self.hold_s

    def threads(self, lane: Lane) -> int:
        """The threads a pass on ``lane`` may use now: every core while the other lane is
        idle, the lane's share while it is busy."""
        other: Lane = "bulk" if lane == "interactive" else "interactive"
        return self.shares[lane] if self.busy(other) else self.cores

    def counts(self) -> list[int]:
        """Every thread count :meth:`threads` can answer (sessions are opened for each)."""
        return sorted({self.cores, *self.shares.values()})

    def shutdown(self) -> None:
        for executor in self.executors.values():
            executor.shutdown(wait=True, cancel_futures=True)


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
        encode: BatchFn[Item],
        max_size: int,
        max_tokens: int,
        threads: LaneThreads,
    ) -> None:
        self.name = name
        self.encode = encode
        self.max_size = max_size
        self.max_tokens = max_tokens
        self.queue: deque[_Request[Item]] = deque()
        self.waiting = 0
        self.wakeup = asyncio.Event()
        self.executor = threads.executors[name]
        self.threads: Threads = functools.partial(threads.threads, name)
        self.working = functools.partial(threads.working, name)
        self.task: asyncio.Task[None] | None = None


class MicroBatcher(Generic[Item]):
    def __init__(
        self,
        encode: BatchFn[Item],
        *,
        encode_bulk: BatchFn[Item] | None = None,
        max_batch_size: int = 64,
        max_batch_tokens: int = 16384,
        max_bulk_tokens: int = 4096,
        max_queue: int = 2048,
        observer: BatchObserver | None = None,
        lanes: LaneThreads | None = None,
        kind: str = "embedding",
    ) -> None:
        """``lanes``: run on another batcher's threads (its :attr:`lanes`; that batcher shuts
        them down), else on threads of its own; ``kind`` names the work in errors and logs."""
        self.kind = kind
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._observer = observer
        self._owns_lanes = lanes is None
        self.lanes = lanes or LaneThreads()
        self._lanes: dict[Lane, _Lane[Item]] = {
            "interactive": _Lane(
                "interactive", encode, max_batch_size, max_batch_tokens, self.lanes
            ),
            "bulk": _Lane(
                "bulk",
                encode_bulk or encode,
                max_batch_size,
                min(max_bulk_tokens, max_batch_tokens),
                self.lanes,
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
        if self._owns_lanes:
            self.lanes.shutdown()

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
                with lane.working():
                    vectors = lane.encode(texts, tokens, lane.threads)
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
