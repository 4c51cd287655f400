"""B1: embedding under concurrency.

64 concurrent clients each post one short text at a time to /v1/embeddings of a real server
process. Throughput (texts/s) is compared, in the same run, with in-process
``SentenceTransformer.encode(batch_size=64)`` on the same texts and with the same server with
batching off (RAG_MAX_BATCH_SIZE=1).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from benchmarks.common import Server, device, faq_pairs, percentiles, write_result


def short_texts(n: int) -> list[str]:
    pairs = faq_pairs()
    texts = [q for _, q, _ in pairs]
    texts += [s.strip() + "." for _, _, a in pairs for s in a.split(".") if 20 < len(s) < 160]
    return [texts[i % len(texts)] for i in range(n)]


def in_process(texts: list[str]) -> float:
    from sentence_transformers import SentenceTransformer

    from rag_service.settings import bundled_embedding_model

    model = SentenceTransformer(bundled_embedding_model(), device=device())
    model.encode(texts[:128], batch_size=64)
    started = time.perf_counter()
    model.encode(texts, batch_size=64)
    return len(texts) / (time.perf_counter() - started)


async def _clients(url: str, texts: list[str], concurrency: int) -> tuple[float, list[float]]:
    """Closed-loop load: ``concurrency`` clients, each posting one text at a time (aiohttp,
    a client light enough not to be the bottleneck on a 2-core machine)."""
    queue = list(reversed(texts))
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as session:

        async def post(text: str) -> None:
            async with session.post("/v1/embeddings", json={"input": text}) as resp:
                resp.raise_for_status()
                await resp.read()

        await asyncio.gather(*[post(t) for t in texts[:concurrency]])  # warm connections

        async def worker() -> None:
            while queue:
                text = queue.pop()
                t = time.perf_counter()
                await post(text)
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - started
    return len(texts) / wall, latencies


def served(texts: list[str], concurrency: int, env: dict[str, str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp, Server(Path(tmp), env) as server:
        rate, latencies = asyncio.run(_clients(server.url, texts, concurrency))
        metrics = httpx.get(server.url + "/metrics").text
    batches = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith(("rag_embedding_batch_size_count", "rag_embedding_batch_size_sum"))
    ]
    mean_batch = batches[1] / batches[0] if len(batches) == 2 and batches[0] else None
    return rate, {"latency": percentiles(latencies), "mean_batch_size": mean_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    texts = short_texts(args.texts)
    baseline = in_process(texts)
    batched, batched_info = served(texts, args.concurrency, {})
    unbatched, unbatched_info = served(texts, args.concurrency, {"RAG_MAX_BATCH_SIZE": "1"})
    write_result(
        "b1_embedding_concurrency",
        vars(args),
        {
            "in_process_texts_per_s": round(baseline, 1),
            "server_batched_texts_per_s": round(batched, 1),
            "server_unbatched_texts_per_s": round(unbatched, 1),
            "batched_vs_in_process": round(batched / baseline, 3),
            "batched_vs_unbatched": round(batched / unbatched, 3),
            "targets": {"batched_vs_in_process": ">= 0.70", "batched_vs_unbatched": ">= 4.0"},
            "batched": batched_info,
            "unbatched": unbatched_info,
        },
    )


if __name__ == "__main__":
    main()
