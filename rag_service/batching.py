"""Dynamic micro-batching of embedding requests.

Concurrent callers put texts in a queue; one worker task takes up to ``max_batch_size`` texts
(or ``max_batch_tokens`` tokens) at a time and encodes them on a single dedicated thread, so
batches form instead of threads fighting over the cores. A batch starts at once when the worker
is idle and no other request follows within ``max_wait_s``; while requests keep arriving it
keeps collecting them, up to ``max_linger_s`` in all. While a batch is encoding, new requests accumulate for the next.

Two lanes: ``interactive`` (queries, /v1/embeddings) always goes first; ``bulk`` (ingest) fills
what is left of a batch. The interactive lane is bounded: past ``max_queue`` waiting texts a
request fails fast with :class:`~rag_service.errors.Overloaded` (HTTP 503 + Retry-After). Bulk
callers are flow-controlled instead: they submit at most one batch at a time and wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from rag_service.errors import Overloaded

__all__ = ["BatchObserver", "MicroBatcher"]

log = logging.getLogger(__name__)

Lane = Literal["interactive", "bulk"]



class BatchObserver(Protocol):
    def batch_done(self, size: int, tokens: int, seconds: float) -> None: ...
    def queue_depth(self, depth: int) -> None: ...


@dataclass(slots=True, eq=False)
class _Request:
    texts: Sequence[str]
    tokens: Sequence[int]
    future: asyncio.Future[np.ndarray]
    rows: list[np.ndarray | None] = field(default_factory=list)
    next_index: int = 0  # first text not yet handed to a batch
    remaining: int = 0  # texts not yet encoded

    def __post_init__(self) -> None:
        self.rows = [None] * len(self.texts)
        self.remaining = len(self.texts)


class MicroBatcher:
    def __init__(
        self,
        encode: Callable[[list[str], list[int]], np.ndarray],
        *,
        max_batch_size: int = 64,
        max_batch_tokens: int = 16384,
        max_wait_s: float = 0.002,
        max_linger_s: float = 0.05,
        max_queue: int = 2048,
        observer: BatchObserver | None = None,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self._encode = encode
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_linger_s = max(max_linger_s, max_wait_s)
        self.max_queue = max_queue
        self._observer = observer
        self._lanes: dict[Lane, deque[_Request]] = {"interactive": deque(), "bulk": deque()}
        self._waiting = {"interactive": 0, "bulk": 0}
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="embedder", initializer=thread_init
        )
        self._task: asyncio.Task[None] | None = None
        self._bulk_gate = asyncio.Semaphore(2)
        self._busy = threading.Event()

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="embedding-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for lane in self._lanes.values():
            for req in lane:
                if not req.future.done():
                    req.future.set_exception(Overloaded("embedding service is shutting down"))
            lane.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return self._waiting["interactive"] + self._waiting["bulk"]

    # ---- submission ------------------------------------------------------------------
    async def embed(
        self, texts: Sequence[str], tokens: Sequence[int], *, lane: Lane = "interactive"
    ) -> np.ndarray:
        """Vectors for ``texts`` (``tokens`` = their token counts), in order."""
        if not texts:
            raise ValueError("embed() needs at least one text")
        if lane == "bulk":
            parts = []
            step = self.max_batch_size
            for i in range(0, len(texts), step):
                async with self._bulk_gate:
                    parts.append(
                        await self._submit(texts[i : i + step], tokens[i : i + step], "bulk")
                    )
            return np.concatenate(parts) if len(parts) > 1 else parts[0]
        if self._waiting["interactive"] + len(texts) > self.max_queue:
            raise Overloaded(
                f"embedding queue is full ({self._waiting['interactive']} texts waiting); "
                "retry shortly",
                retry_after_s=1,
            )
        return await self._submit(texts, tokens, "interactive")

    async def _submit(self, texts: Sequence[str], tokens: Sequence[int], lane: Lane) -> np.ndarray:
        if self._task is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        req = _Request(texts, tokens, future)
        self._lanes[lane].append(req)
        self._waiting[lane] += len(texts)
        self._report_depth()
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away: drop whatever of it has not been handed to a batch.
            if req in self._lanes[lane]:
                self._lanes[lane].remove(req)
                self._waiting[lane] -= len(texts) - req.next_index
                self._report_depth()
            raise

    # ---- worker ----------------------------------------------------------------------
    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.queue_depth(self.queue_depth)

    def _take_batch(self) -> list[tuple[_Request, int, int]]:
        """Slices (request, start, stop) forming the next batch, interactive lane first."""
        batch: list[tuple[_Request, int, int]] = []
        size = tokens = 0
        for lane_name in ("interactive", "bulk"):
            lane = self._lanes[lane_name]  # type: ignore[index]
            while lane and size < self.max_batch_size:
                req = lane[0]
                start = stop = req.next_index
                while stop < len(req.texts) and size < self.max_batch_size:
                    t = req.tokens[stop]
                    if size and tokens + t > self.max_batch_tokens:
                        break
                    size += 1
                    tokens += t
                    stop += 1
                if stop == start:
                    return batch  # token budget exhausted
                batch.append((req, start, stop))
                req.next_index = stop
                self._waiting[lane_name] -= stop - start  # type: ignore[index]
                if stop == len(req.texts):
                    lane.popleft()
                else:
                    return batch
        return batch

    async def _linger(self, loop: asyncio.AbstractEventLoop) -> None:
        """Collect a burst: wait while requests keep arriving, each within ``max_wait_s`` of
        the previous one, until the batch is full or ``max_linger_s`` has passed. A lone
        request (nothing else arrives within ``max_wait_s``) goes at once."""
        if self.max_wait_s <= 0:
            return
        deadline = loop.time() + self.max_linger_s
        while self.queue_depth < self.max_batch_size:
            before = self.queue_depth
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), min(self.max_wait_s, remaining))
            if self.queue_depth == before:
                return  # nothing arrived within max_wait_s: the burst is over

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue_depth:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._linger(loop)
            batch = self._take_batch()
            self._report_depth()
            if not batch:
                continue
            texts = [t for req, a, b in batch for t in req.texts[a:b]]
            tokens = [n for req, a, b in batch for n in req.tokens[a:b]]
            n_tokens = sum(tokens)
            started = loop.time()
            try:
                vectors = await loop.run_in_executor(self._executor, self._encode, texts, tokens)
            except Exception as exc:
                log.exception("embedding batch of %d texts failed", len(texts))
                for req, _, _ in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)
                continue
            if self._observer is not None:
                self._observer.batch_done(len(texts), n_tokens, loop.time() - started)
            row = 0
            for req, a, b in batch:
                for i in range(a, b):
                    req.rows[i] = vectors[row]
                    row += 1
                req.remaining -= b - a
                if req.remaining == 0 and not req.future.done():
                    req.future.set_result(np.stack(req.rows))  # type: ignore[arg-type]
