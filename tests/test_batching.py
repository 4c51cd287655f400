from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from rag_service.batching import LaneThreads, MicroBatcher, Threads, lane_shares
from rag_service.errors import Overloaded
from rag_service.runtimes import sub_batches


class Recorder:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.depths: list[int] = []

    def batch_done(self, size: int, tokens: int, seconds: float) -> None:
        self.sizes.append(size)

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)


def test_results_match_direct_encoding_and_order(embedder):
    texts = [f"text number {i} " * (i % 5 + 1) for i in range(40)]

    async def go() -> list[np.ndarray]:
        rec = Recorder()
        b = MicroBatcher(embedder.encode, max_batch_size=16, observer=rec)
        await b.start()
        try:
            out = await asyncio.gather(
                *[b.embed([t], [8]) for t in texts[:30]], b.embed(texts[30:], [8] * 10, lane="bulk")
            )
        finally:
            await b.stop()
        assert max(rec.sizes) <= 16 and sum(rec.sizes) == 40
        assert len(rec.sizes) < 30
        return [o for o in out]

    out = asyncio.run(go())
    expected = embedder.encode(texts)
    got = np.concatenate(out)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_token_budget_splits_batches():
    seen: list[int] = []

    def encode(texts: list[str], tokens: list[int], threads: Threads) -> np.ndarray:
        seen.append(len(texts))
        return np.zeros((len(texts), 2), np.float32)

    async def go() -> None:
        b = MicroBatcher(encode, max_batch_size=64, max_batch_tokens=100)
        await b.start()
        await b.embed(["x"] * 10, [30] * 10, lane="bulk")
        await b.stop()

    asyncio.run(go())
    assert seen and max(seen) <= 3 and sum(seen) == 10


def test_queries_never_wait_behind_ingest():
    gate = threading.Event()

    def slow_bulk(texts: list[str], tokens: list[int], threads: Threads) -> np.ndarray:
        gate.wait(10)
        return np.ones((len(texts), 2), np.float32)

    def fast(texts: list[str], tokens: list[int], threads: Threads) -> np.ndarray:
        return np.zeros((len(texts), 2), np.float32)

    async def go() -> None:
        b = MicroBatcher(fast, encode_bulk=slow_bulk, max_batch_size=4)
        await b.start()
        bulk = asyncio.create_task(b.embed(["b"] * 8, [1] * 8, lane="bulk"))
        await asyncio.sleep(0.05)  # the ingest batch is encoding (blocked)
        query = await asyncio.wait_for(b.embed(["q"], [1]), timeout=2)
        assert query.tolist() == [[0.0, 0.0]] and not bulk.done()
        gate.set()
        assert (await bulk).shape == (8, 2)
        await b.stop()

    asyncio.run(go())


def test_bulk_batches_respect_token_cap():
    sizes: list[int] = []

    def encode(texts: list[str], tokens: list[int], threads: Threads) -> np.ndarray:
        sizes.append(sum(tokens))
        return np.zeros((len(texts), 2), np.float32)

    async def go() -> None:
        b = MicroBatcher(encode, max_batch_size=64, max_bulk_tokens=600)
        await b.start()
        await b.embed(["x"] * 20, [200] * 20, lane="bulk")
        await b.stop()

    asyncio.run(go())
    assert max(sizes) <= 600 and sum(sizes) == 4000


def test_queue_bound_and_errors():
    def encode(texts: list[str], tokens: list[int], threads: Threads) -> np.ndarray:
        if "boom" in texts:
            raise RuntimeError("model failure")
        return np.zeros((len(texts), 2), np.float32)

    async def go() -> None:
        b = MicroBatcher(encode, max_batch_size=1, max_queue=2)
        await b.start()
        with pytest.raises(Overloaded):
            await b.embed(["a", "b", "c"], [1, 1, 1])
        with pytest.raises(RuntimeError, match="model failure"):
            await b.embed(["boom"], [1])
        assert (await b.embed(["fine"], [1])).shape == (1, 2)
        await b.stop()

    asyncio.run(go())


def test_sub_batches_sort_by_length_and_bound_the_padded_size():
    tokens = [5, 200, 6, 7, 180, 5, 40, 41, 300, 2000]
    groups = sub_batches(tokens, 1024)
    assert sorted(i for g in groups for i in g) == list(range(len(tokens)))
    flat = [tokens[i] for g in groups for i in g]
    assert flat == sorted(tokens)  # length-sorted, so a group pads little
    for g in groups:
        lengths = [tokens[i] for i in g]
        # rows x longest within the budget (a text alone may exceed it), similar lengths
        assert len(g) * max(lengths) <= 1024 or len(g) == 1
        assert max(lengths) <= max(min(lengths) * 1.3, min(lengths) + 4)
    assert [len(g) for g in sub_batches([128] * 20, 1024)] == [8, 8, 4]


def test_grouped_encoding_keeps_order(embedder):
    texts = ["short one", "a much longer text " * 20, "mid length text here", "tiny"]
    tokens = embedder.count_tokens(texts)
    np.testing.assert_allclose(
        embedder.encode(texts, tokens),
        np.stack([embedder.encode([t])[0] for t in texts]),
        atol=1e-5,
    )


def test_a_lone_request_goes_at_once_and_a_batch_forms_while_the_encoder_is_busy():
    """No batching wait: a request that finds the lane idle is encoded alone, at once; the
    requests that arrive while it encodes form the next batch, together."""
    sizes: list[int] = []
    busy = threading.Event()
    release = threading.Event()

    def encode(texts: list[str], tokens: list[int], threads: Threads) -> np.ndarray:
        sizes.append(len(texts))
        if len(sizes) == 1:
            busy.set()
            release.wait(10)  # the first batch holds the encoder while others arrive
        return np.full((len(texts), 2), float(len(sizes)), np.float32)

    async def go() -> None:
        rec = Recorder()
        b = MicroBatcher(encode, max_batch_size=64, observer=rec)
        await b.start()
        first = asyncio.create_task(b.embed(["alone"], [1]))
        await asyncio.to_thread(busy.wait, 5)
        assert sizes == [1]  # taken the moment it arrived: nobody waited for company
        rest = [asyncio.create_task(b.embed([f"q{i}"], [1])) for i in range(20)]
        await asyncio.sleep(0.05)
        assert sizes == [1]  # queued behind the busy encoder
        release.set()
        assert (await first).tolist() == [[1.0, 1.0]]
        assert all(r.tolist() == [[2.0, 2.0]] for r in await asyncio.gather(*rest))
        started = asyncio.get_running_loop().time()
        await b.embed(["later, alone"], [1])
        assert asyncio.get_running_loop().time() - started < 1.0
        await b.stop()
        assert rec.sizes == [1, 20, 1]

    asyncio.run(go())
    assert sizes == [1, 20, 1]


def test_lane_shares_add_up_to_the_cores():
    assert lane_shares(1) == {"interactive": 1, "bulk": 1}
    assert lane_shares(2) == {"interactive": 1, "bulk": 1}
    assert lane_shares(3) == {"interactive": 1, "bulk": 2}
    assert lane_shares(16) == {"interactive": 4, "bulk": 12}


def test_a_lane_alone_gets_every_core_and_both_busy_split_them():
    lanes = LaneThreads(3, hold_s=0.2)
    try:
        assert lanes.threads("bulk") == 3 and lanes.threads("interactive") == 3
        with lanes.working("interactive"):
            assert lanes.threads("bulk") == 2  # its share while queries run
        assert lanes.threads("bulk") == 2  # held a moment after the last query
        assert lanes.threads("interactive") == 3
        deadline = time.monotonic() + 5
        while lanes.threads("bulk") != 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lanes.threads("bulk") == 3  # the hold ended: every core again
        with lanes.working("bulk"):
            assert lanes.threads("interactive") == 1
    finally:
        lanes.shutdown()


def test_an_ingest_gives_cores_to_a_query_between_sub_batches():
    """The bulk batch function asks for its threads before each sub-batch: alone it gets
    every core, while a query is encoding only its share, and every core again after."""
    seen: list[int] = []
    query_running = threading.Event()
    query_release = threading.Event()
    step = threading.Event()

    def bulk(texts: list[str], tokens: list[int], threads: Threads) -> np.ndarray:
        for i in range(len(texts)):
            seen.append(threads())
            if i == 0:
                step.set()
                query_running.wait(5)  # the query is now encoding
            elif i == 1:
                query_release.set()
                time.sleep(0.25)  # past the hold
        return np.zeros((len(texts), 2), np.float32)

    def query(texts: list[str], tokens: list[int], threads: Threads) -> np.ndarray:
        seen.append(-threads())
        query_running.set()
        query_release.wait(5)
        return np.zeros((len(texts), 2), np.float32)

    async def go() -> None:
        lanes = LaneThreads(3, hold_s=0.1)
        b = MicroBatcher(query, encode_bulk=bulk, lanes=lanes)
        await b.start()
        ingest = asyncio.create_task(b.embed(["a", "b", "c"], [1, 1, 1], lane="bulk"))
        await asyncio.to_thread(step.wait, 5)
        await b.embed(["q"], [1])
        await ingest
        await b.stop()
        lanes.shutdown()

    asyncio.run(go())
    # bulk alone: 3; the query, with the ingest busy: its share 1; bulk during the query: 2;
    # bulk after the query's hold: 3 again
    assert seen == [3, -1, 2, 3], seen
