"""E1: the embedding runtime, PyTorch vs ONNX Runtime (fp32, and int8 as an opt-in).

All in one run, side by side, on the bundled all-MiniLM-L6-v2:

* encoder: one-query latency p50/p99 and bulk texts/s (chunks of B3's Python-doc sentences,
  the service's length-grouped batches) for PyTorch, ONNX fp32 and ONNX int8, plus raw
  ``SentenceTransformer.encode``; the export time and the probe cosine; the query latency
  alone and under a concurrent bulk pass for several intra-op thread splits (what
  :func:`rag_service.onnx_encoder.lane_threads` chose from);
* search over HTTP (a real ``rag-service serve``, a 10k-chunk exact collection built from B3's
  data), 1 and 32 clients, torch vs onnx, against in-process sentence-transformers ``encode``
  + FAISS search of the same queries. Target: onnx HTTP p50 <= 0.6x the in-process figure;
* ingest chunks/s over HTTP, torch vs onnx, against raw ``encode`` of the same chunks.
  Target: onnx >= 1.8x raw encode;
* B1 (64 clients on /v1/embeddings) and B4 (search p99 while another client ingests) rerun
  on each runtime;
* int8's quality cost: recall@1/@5 of the rephrased Debian FAQ questions against the FAQ
  answers, fp32 vs int8.

The load average before and after is recorded: on a shared 2-core machine it moves every
figure, so compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np

from benchmarks.bench_embedding import _clients, short_texts
from benchmarks.bench_search import build_store, ingest_load, queries, sentences
from benchmarks.common import ROOT, Server, faq_pairs, percentiles, write_result


def _lat(fn: Any, items: list[Any]) -> list[float]:
    for item in items[:5]:
        fn(item)
    out = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        out.append(time.perf_counter() - t)
    return out


def encoder_figures(qs: list[str], chunks: list[str], cache: Path) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from rag_service.embedding import Embedder
    from rag_service.onnx_encoder import graph_entry
    from rag_service.settings import bundled_embedding_model

    path = bundled_embedding_model()
    started = time.perf_counter()
    onnx = Embedder(path, device="cpu", runtime="onnx", cache_root=cache)
    first_start = time.perf_counter() - started
    meta = json.loads(
        (graph_entry(Path(path), "embedding", cache_root=cache) / "meta.json").read_text()
    )
    started = time.perf_counter()
    Embedder(path, device="cpu", runtime="onnx", cache_root=cache)
    cached_start = time.perf_counter() - started
    int8 = Embedder(path, device="cpu", runtime="onnx", quantize="int8", cache_root=cache)
    torch_e = Embedder(path, device="cpu", runtime="torch")
    raw = SentenceTransformer(path, device="cpu")
    out: dict[str, Any] = {
        "export_seconds": meta["export_s"],
        "first_start_seconds_with_export": round(first_start, 2),
        "start_seconds_cached": round(cached_start, 2),
        "probe_cosine_fp32": onnx.probe_cosine,
        "probe_cosine_int8": int8.probe_cosine,
        "threads": onnx._graph.threads if onnx._graph else None,
    }
    one: dict[str, Any] = {}
    for name, fn in (
        ("torch", lambda q: torch_e.encode([q])),
        ("onnx", lambda q: onnx.encode([q])),
        ("onnx_int8", lambda q: int8.encode([q])),
        ("raw_sentence_transformers", lambda q: raw.encode([q], normalize_embeddings=True)),
    ):
        one[name] = percentiles(_lat(fn, qs))
    out["one_query"] = one
    tokens = onnx.count_tokens(chunks)
    bulk: dict[str, float] = {}
    for name, fn in (
        (
            "torch",
            lambda: [
                torch_e.encode_bulk(chunks[i : i + 64], tokens[i : i + 64])
                for i in range(0, len(chunks), 64)
            ],
        ),
        (
            "onnx",
            lambda: [
                onnx.encode_bulk(chunks[i : i + 64], tokens[i : i + 64])
                for i in range(0, len(chunks), 64)
            ],
        ),
        (
            "onnx_int8",
            lambda: [
                int8.encode_bulk(chunks[i : i + 64], tokens[i : i + 64])
                for i in range(0, len(chunks), 64)
            ],
        ),
        (
            "raw_sentence_transformers",
            lambda: raw.encode(chunks, batch_size=64, normalize_embeddings=True),
        ),
    ):
        t = time.perf_counter()
        fn()
        bulk[name] = round(len(chunks) / (time.perf_counter() - t), 1)
    out["bulk_texts_per_s"] = bulk
    out["bulk_mean_tokens"] = round(statistics.mean(tokens), 1)
    out["threads_split"] = thread_split(onnx, qs, chunks)
    return out


def thread_split(onnx: Any, qs: list[str], chunks: list[str]) -> dict[str, Any]:
    """One-query latency alone and under a concurrent bulk loop, for lane thread splits."""
    from rag_service.onnx_encoder import OnnxGraph

    assert onnx._graph is not None
    entry, pooling = onnx._graph.entry, onnx._pooling
    results: dict[str, Any] = {}
    for q_threads, b_threads in ((1, 1), (2, 1), (2, 2)):
        graph = OnnxGraph(entry, {"interactive": q_threads, "bulk": b_threads})
        results[f"interactive{q_threads}_bulk{b_threads}"] = _split(
            onnx, graph, pooling, qs, chunks
        )
    return results


def _split(onnx: Any, graph: Any, pooling: Any, qs: list[str], chunks: list[str]) -> dict:
    def query(q: str) -> None:
        onnx._embed_onnx(graph, pooling, [q], "interactive")

    alone = percentiles(_lat(query, qs[:60]))
    stop, done = threading.Event(), [0]

    def loop() -> None:
        while not stop.is_set():
            onnx._embed_onnx(graph, pooling, chunks[:16], "bulk")
            done[0] += 16

    worker = threading.Thread(target=loop)
    worker.start()
    time.sleep(0.3)
    t = time.perf_counter()
    busy = percentiles(_lat(query, qs[:60]))
    rate = done[0] / (time.perf_counter() - t + 0.3)
    stop.set()
    worker.join()
    return {
        "query_alone": alone,
        "query_during_bulk": busy,
        "bulk_texts_per_s_meanwhile": round(rate, 1),
    }


def search_latency(url: str, collection: str, qs: list[str], clients: int) -> list[float]:
    async def run() -> list[float]:
        lat: list[float] = []
        pending = list(qs)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for q in qs[:5]:
                await client.post(f"/v1/collections/{collection}/search", json={"query": q})

            async def worker() -> None:
                while pending:
                    q = pending.pop()
                    t = time.perf_counter()
                    r = await client.post(
                        f"/v1/collections/{collection}/search", json={"query": q, "top_k": 10}
                    )
                    lat.append(time.perf_counter() - t)
                    r.raise_for_status()

            await asyncio.gather(*[worker() for _ in range(clients)])
        return lat

    return asyncio.run(run())


def in_process_search(vectors: np.ndarray, qs: list[str]) -> list[float]:
    from sentence_transformers import SentenceTransformer

    from rag_service.settings import bundled_embedding_model

    model = SentenceTransformer(bundled_embedding_model(), device="cpu")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return _lat(lambda q: index.search(model.encode([q], normalize_embeddings=True), 10), qs)


def ingest_rate(url: str, chunks: list[str]) -> float:
    with httpx.Client(base_url=url, timeout=300) as client:
        docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(chunks)]
        client.post("/v1/collections/ing/documents", json={"documents": docs[:8]})
        t = time.perf_counter()
        for i in range(8, len(docs), 32):
            client.post(
                "/v1/collections/ing/documents", json={"documents": docs[i : i + 32]}
            ).raise_for_status()
        return (len(docs) - 8) / (time.perf_counter() - t)


def b4(url: str, collection: str, qs: list[str], texts: list[str]) -> dict[str, Any]:
    idle = search_latency(url, collection, qs, 1)
    stop, counter = threading.Event(), [0]
    writer = threading.Thread(target=ingest_load, args=(url, stop, texts, counter))
    writer.start()
    time.sleep(2.0)
    busy = search_latency(url, collection, qs, 1)
    stop.set()
    writer.join()
    p_idle, p_busy = percentiles(idle), percentiles(busy)
    return {
        "idle": p_idle,
        "during_ingest": p_busy,
        "documents_ingested_meanwhile": counter[0],
        "p99_ratio": round(p_busy["p99_ms"] / p_idle["p99_ms"], 3),
    }


def int8_quality(cache: Path) -> dict[str, Any]:
    from rag_service.embedding import Embedder
    from rag_service.settings import bundled_embedding_model

    answers = {anchor: answer for anchor, _, answer in faq_pairs()}
    ids = list(answers)
    lines = (ROOT / "benchmarks/data/debian_faq_rephrased.jsonl").read_text().splitlines()
    held = [json.loads(line) for line in lines]
    held = [r for r in held if r["document_id"] in answers]
    out: dict[str, Any] = {"questions": len(held), "documents": len(ids)}
    for name, quantize in (("fp32", "none"), ("int8", "int8")):
        e = Embedder(bundled_embedding_model(), device="cpu", quantize=quantize, cache_root=cache)
        docs = [answers[i] for i in ids]
        dv = e.encode(docs, e.count_tokens(docs))
        qv = e.encode([r["rephrased"] for r in held])
        top = np.argsort(-(qv @ dv.T), axis=1)[:, :5]
        gold = np.array([ids.index(r["document_id"]) for r in held])
        out[name] = {
            "recall_at_1": round(float(np.mean(top[:, 0] == gold)), 4),
            "recall_at_5": round(
                float(np.mean([g in t for g, t in zip(gold, top, strict=True)])), 4
            ),
        }
    out["recall_at_1_cost"] = round(out["fp32"]["recall_at_1"] - out["int8"]["recall_at_1"], 4)
    out["recall_at_5_cost"] = round(out["fp32"]["recall_at_5"] - out["int8"]["recall_at_5"], 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=1000, help="really embedded sentences")
    parser.add_argument("--scale", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--chunks", type=int, default=256, help="ingest / bulk texts")
    parser.add_argument("--b1-texts", type=int, default=1024)
    parser.add_argument("--skip-encoder", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="rag-onnx-bench-"))
    cache = tmp / "cache"
    figures: dict[str, Any] = {"load_average_before": [round(x, 2) for x in load_before]}
    try:
        texts = sentences(args.base)
        qs = queries(args.queries)
        chunks = [
            " ".join(texts[(4 * i + j) % len(texts)] for j in range(4)) for i in range(args.chunks)
        ]
        # The in-process baseline first, before any ONNX session exists in this process.
        from sentence_transformers import SentenceTransformer

        from rag_service.settings import bundled_embedding_model

        model = SentenceTransformer(bundled_embedding_model(), device="cpu")
        vectors = model.encode(texts, batch_size=64, normalize_embeddings=True).astype(np.float32)
        data = tmp / "data"
        build_store(data, texts, vectors, args.scale, ["Flat"])
        from benchmarks.bench_search import expand

        base = percentiles(in_process_search(expand(texts, vectors, args.scale), qs))
        t = time.perf_counter()
        model.encode(chunks, batch_size=64, normalize_embeddings=True)
        raw_rate = len(chunks) / (time.perf_counter() - t)
        figures["in_process_embed_plus_faiss"] = base
        figures["raw_encode_chunks_per_s"] = round(raw_rate, 1)
        if not args.skip_encoder:
            figures["encoder"] = encoder_figures(qs, chunks, cache)
            figures["int8_quality"] = int8_quality(cache)
        collection = f"s{args.scale // 1000}k-flat"
        b1_texts = short_texts(args.b1_texts)
        for runtime in ("torch", "onnx"):
            env = {
                "RAG_EMBEDDING_RUNTIME": runtime,
                "RAG_CACHE_DIR": str(cache),
                "RAG_SNAPSHOT_INTERVAL_S": "3600",
            }
            run: dict[str, Any] = {}
            with Server(data, env) as server:
                ready = httpx.get(server.url + "/ready").json()
                run["runtime"] = ready["runtimes"][ready["embedding_model"]]
                for clients in (1, 32):
                    p = percentiles(search_latency(server.url, collection, qs, clients))
                    run[f"search_{clients}_clients"] = p
                run["search_p50_over_in_process_p50"] = round(
                    run["search_1_clients"]["p50_ms"] / base["p50_ms"], 3
                )
                run["b4"] = b4(server.url, collection, qs, texts)
            ingest_dir = tmp / f"ingest-{runtime}"
            with Server(ingest_dir, env) as server:
                rate = ingest_rate(server.url, chunks)
                run["ingest_chunks_per_s"] = round(rate, 1)
                run["ingest_over_raw_encode"] = round(rate / raw_rate, 3)
            with Server(tmp / f"b1-{runtime}", env) as server:
                b1_rate, latencies = asyncio.run(_clients(server.url, b1_texts, 64))
                metrics = httpx.get(server.url + "/metrics").text
            sums = {
                line.split()[0]: float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith(
                    ("rag_embedding_batch_size_count", "rag_embedding_batch_size_sum")
                )
            }
            count = sums.get("rag_embedding_batch_size_count", 0.0)
            run["b1"] = {
                "texts_per_s": round(b1_rate, 1),
                "latency": percentiles(latencies),
                "mean_batch_size": round(sums.get("rag_embedding_batch_size_sum", 0.0) / count, 2)
                if count
                else None,
            }
            figures[runtime] = run
        figures["targets"] = {
            "onnx_search_p50_over_in_process_p50": "<= 0.6",
            "onnx_ingest_over_raw_encode": ">= 1.8",
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    write_result("onnx", {k: str(v) for k, v in vars(args).items()}, figures)


if __name__ == "__main__":
    main()
