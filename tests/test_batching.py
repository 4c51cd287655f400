from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from rag_service.batching import MicroBatcher
from rag_service.errors import Overloaded


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

    def encode(texts: list[str], tokens: list[int]) -> np.ndarray:
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

    def slow_bulk(texts: list[str], tokens: list[int]) -> np.ndarray:
        gate.wait(10)
        return np.ones((len(texts), 2), np.float32)

    def fast(texts: list[str], tokens: list[int]) -> np.ndarray:
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

    def encode(texts: list[str], tokens: list[int]) -> np.ndarray:
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
    def encode(texts: list[str], tokens: list[int]) -> np.ndarray:
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


def test_length_groups_bound_padding():
    from rag_service.embedding import length_groups

    tokens = [5, 200, 6, 7, 180, 5, 40, 41, 300]
    groups = length_groups(tokens)
    assert sorted(i for g in groups for i in g) == list(range(len(tokens)))
    for g in groups:
        lengths = [tokens[i] for i in g]
        assert max(lengths) <= max(min(lengths) * 1.3, min(lengths) + 4)
    assert len(length_groups([10] * 200)) == 4  # at most 64 per group


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

    def encode(texts: list[str], tokens: list[int]) -> np.ndarray:
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
