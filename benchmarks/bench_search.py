"""B3 search latency, B4 searches during writes, B5 restart time.

Corpus: sentences of the Python documentation (Debian python3.11-doc), one chunk each, really
embedded by the bundled model (``--base`` of them). The 100k-chunk scale adds noisy copies of
those real vectors (cosine ~0.9 to their source), written through the document store like an
ingest would, because embedding 100k texts on a 2-core CPU takes most of an hour; the index
and the search path see exactly what they would see after a real ingest.

* B3: HTTP search p50/p99 for 10k and 100k chunks, exact (Flat) and HNSW32, HNSW recall@10
  against exact, and the HTTP p50 over in-process ``encode`` + FAISS search of the same query.
* B4: search p99 on the 10k collection while another client ingests documents, over idle p99.
* B5: time until /ready with 100k chunks per collection, first without snapshots (index rebuilt
  from stored embeddings) and then from snapshots; the restore report shows 0 re-embedded.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import faiss
import httpx
import numpy as np

from benchmarks.common import Server, device, faq_pairs, percentiles, python_doc_files, write_result


def sentences(n: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for _, text in python_doc_files():
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 40 <= len(s) <= 300 and not s.startswith((".. ", ":")) and s not in seen:
                seen.add(s)
                out.append(s)
                if len(out) >= n:
                    return out
    return out


def queries(n: int) -> list[str]:
    qs = [q for _, q, _ in faq_pairs()]
    qs += [
        f"How do I use {w} in Python?"
        for w in (
            "list comprehensions",
            "dictionaries",
            "decorators",
            "generators",
            "exceptions",
            "context managers",
            "the json module",
            "asyncio",
            "f-strings",
            "virtual environments",
        )
    ]
    return [qs[i % len(qs)] for i in range(n)]


def build_store(
    data_dir: Path, texts: list[str], vectors: np.ndarray, scale: int, factories: list[str]
) -> None:
    """Write collections of ``scale`` chunks straight into the document store."""
    from indexes.docstore import DocumentStore
    from indexes.types import Chunk, CollectionOptions, DocumentWrite, content_hash
    from rag_service.embedding import BUNDLED_NAME

    store = DocumentStore(data_dir / "rag.sqlite3", synchronous="NORMAL")
    base = len(texts)
    expanded = expand(texts, vectors, scale)
    for factory in factories:
        name = f"s{scale // 1000}k-{factory.lower()}"
        create = CollectionOptions(
            name=name,
            embedding_model=BUNDLED_NAME,
            dimension=384,
            index=factory,
            chunk_tokens=200,
            chunk_overlap=40,
        )
        row = None
        for start in range(0, scale, 2000):
            writes = []
            for i in range(start, min(start + 2000, scale)):
                src = i % base
                text = texts[src] if i < base else f"{texts[src]} (variant {i // base})"
                vec = expanded[i]
                writes.append(
                    DocumentWrite(
                        f"c{i}",
                        text,
                        {"n": i % 10},
                        content_hash(text),
                        [Chunk(0, 0, len(text), text)],
                        vec[None, :],
                    )
                )
            staged, row = store.stage_upsert(row, create if row is None else None, writes)
            staged.commit()
    store.close()


def http_latencies(
    url: str, collection: str, qs: list[str], top_k: int = 10
) -> tuple[list[float], list[list[str]]]:
    lat, ids = [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        for q in qs[:5]:
            client.post(f"/v1/collections/{collection}/search", json={"query": q})
        for q in qs:
            t = time.perf_counter()
            resp = client.post(
                f"/v1/collections/{collection}/search", json={"query": q, "top_k": top_k}
            )
            lat.append(time.perf_counter() - t)
            resp.raise_for_status()
            ids.append([r["document_id"] for r in resp.json()["results"]])
    return lat, ids


def in_process(model, vectors: np.ndarray, qs: list[str], top_k: int = 10) -> list[float]:
    index = faiss.IndexFlatIP(vectors.shape[1])
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(vectors)
    for q in qs[:5]:
        index.search(model.encode([q], normalize_embeddings=True), top_k)
    lat = []
    for q in qs:
        t = time.perf_counter()
        index.search(model.encode([q], normalize_embeddings=True), top_k)
        lat.append(time.perf_counter() - t)
    return lat


def expand(texts: list[str], vectors: np.ndarray, scale: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    out = np.empty((scale, vectors.shape[1]), np.float32)
    base = len(texts)
    for i in range(scale):
        v = vectors[i % base]
        if i >= base:
            v = v + rng.normal(0, 0.025, v.shape).astype(np.float32)
            v /= np.linalg.norm(v)
        out[i] = v
    return out


def ingest_load(url: str, stop: threading.Event, texts: list[str], counter: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        i = 0
        while not stop.is_set():
            docs = [
                {
                    "id": f"w{i}-{j}",
                    "text": " ".join(texts[(i * 16 + j) % len(texts)] for _ in range(3)),
                }
                for j in range(16)
            ]
            client.post("/v1/collections/writes/documents", json={"documents": docs})
            counter[0] += len(docs)
            i += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=10_000, help="really embedded sentences")
    parser.add_argument("--scales", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--keep", type=Path, default=None, help="keep the data dir here")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")]

    from sentence_transformers import SentenceTransformer

    from rag_service.settings import bundled_embedding_model

    model = SentenceTransformer(bundled_embedding_model(), device=device())
    texts = sentences(args.base)
    t = time.perf_counter()
    vectors = model.encode(texts, batch_size=64, normalize_embeddings=True).astype(np.float32)
    embed_s = time.perf_counter() - t
    qs = queries(args.queries)
    figures: dict = {"base_sentences": len(texts), "base_embed_seconds": round(embed_s, 1)}

    tmp = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    data = args.keep or tmp / "data"
    try:
        for scale in scales:
            build_store(data, texts, vectors, scale, ["Flat", "HNSW32"])
        env = {"RAG_SNAPSHOT_INTERVAL_S": "3600"}
        # B5, first start: no snapshots, every index rebuilt from stored embeddings.
        server = Server(data, env).start()
        cold = server.ready_seconds
        cold_report = httpx.get(server.url + "/ready").json()["restore"]
        server.stop()  # a clean stop writes the snapshots
        server = Server(data, env).start()
        warm = server.ready_seconds
        warm_report = httpx.get(server.url + "/ready").json()["restore"]
        figures["b5_restart"] = {
            "chunks_total": sum(r["from_snapshot"] for r in warm_report),
            "ready_seconds_without_snapshots": round(cold, 2),
            "ready_seconds_from_snapshots": round(warm, 2),
            "reembedded": sum(r["reembedded"] for r in warm_report + cold_report),
            "restore_without_snapshots": cold_report,
            "restore_from_snapshots": warm_report,
        }
        try:
            b3: dict = {}
            for scale in scales:
                exact_name = f"s{scale // 1000}k-flat"
                lat_exact, ids_exact = http_latencies(server.url, exact_name, qs)
                lat_hnsw, ids_hnsw = http_latencies(server.url, f"s{scale // 1000}k-hnsw32", qs)
                base_lat = in_process(model, expand(texts, vectors, scale), qs)
                recall = np.mean(
                    [
                        len(set(a) & set(b)) / max(len(a), 1)
                        for a, b in zip(ids_exact, ids_hnsw, strict=True)
                    ]
                )
                p_exact, p_base = percentiles(lat_exact), percentiles(base_lat)
                b3[f"{scale}"] = {
                    "http_exact": p_exact,
                    "http_hnsw32": percentiles(lat_hnsw),
                    "in_process_embed_plus_faiss_exact": p_base,
                    "http_p50_over_in_process_p50": round(p_exact["p50_ms"] / p_base["p50_ms"], 3),
                    "hnsw32_recall_at_10_vs_exact": round(float(recall), 4),
                }
            figures["b3_search"] = b3
            figures["b3_target"] = "http_p50_over_in_process_p50 <= 1.3"

            # B4: search p99 on the smallest exact collection, idle vs during an ingest.
            name = f"s{scales[0] // 1000}k-flat"
            idle, _ = http_latencies(server.url, name, qs)
            stop, counter = threading.Event(), [0]
            writer = threading.Thread(target=ingest_load, args=(server.url, stop, texts, counter))
            writer.start()
            time.sleep(2.0)
            busy, _ = http_latencies(server.url, name, qs)
            stop.set()
            writer.join()
            p_idle, p_busy = percentiles(idle), percentiles(busy)
            figures["b4_search_during_ingest"] = {
                "idle": p_idle,
                "during_ingest": p_busy,
                "documents_ingested_meanwhile": counter[0],
                "p99_ratio": round(p_busy["p99_ms"] / p_idle["p99_ms"], 3),
                "target": "p99_ratio <= 2.0",
            }
        finally:
            server.stop()
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    write_result("b3_b4_b5_search", {k: str(v) for k, v in vars(args).items()}, figures)


if __name__ == "__main__":
    main()
