"""B2 ingest throughput and B6 side by side with txtai, on a real corpus.

Corpus: the Python tutorial sources from Debian's python3.11-doc (reST, one document per file).

* B2: documents upserted over HTTP into a real server process; chunks/s compared with
  in-process ``SentenceTransformer.encode(batch_size=64)`` of exactly the chunks the service
  makes; then the same documents posted again (all unchanged) and the speed-up measured.
* B6: txtai (``Embeddings`` with the same bundled model directory, sentence-transformers,
  FAISS, content storage) indexing the same chunks, and search p50 on the same queries: txtai
  in-process against rag-service over HTTP (so rag-service pays the network hop).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import Server, device, percentiles, python_doc_files, write_result

QUERIES = [
    "How do I define a function with default arguments?",
    "What is a list comprehension?",
    "How do I read and write files?",
    "How do exceptions work and how do I raise one?",
    "What are classes and how does inheritance work?",
    "How do I create a virtual environment?",
    "What is the difference between a tuple and a list?",
    "How do I format strings?",
    "What does the with statement do?",
    "How do modules and packages work?",
    "How do I loop over a dictionary?",
    "What are generators and iterators?",
    "How does floating point arithmetic lose precision?",
    "How do I use the interactive interpreter?",
    "What are lambda expressions?",
]


def corpus(prefix: str) -> list[tuple[str, str]]:
    return [(rid, text) for rid, text in python_doc_files() if rid.startswith(prefix)]


def service_chunks(docs: list[tuple[str, str]]) -> list[str]:
    """The chunks the service will make, with its default settings."""
    from rag_service.chunking import ChunkingConfig, chunk_offsets
    from rag_service.embedding import Embedder
    from rag_service.settings import Settings

    settings = Settings()
    embedder = Embedder(settings.embedding_model_path, device="cpu")
    cfg = ChunkingConfig(
        min(settings.chunk_tokens, embedder.content_window), settings.chunk_overlap
    )
    texts = [t for _, t in docs]
    return [
        c.text
        for text, offsets in zip(texts, embedder.offsets(texts), strict=True)
        for c in chunk_offsets(text, offsets, cfg)
    ]


def in_process(chunks: list[str]) -> float:
    from sentence_transformers import SentenceTransformer

    from rag_service.settings import bundled_embedding_model

    model = SentenceTransformer(bundled_embedding_model(), device=device())
    model.encode(chunks[:32], batch_size=32)
    started = time.perf_counter()
    model.encode(chunks, batch_size=64)
    return len(chunks) / (time.perf_counter() - started)


def post_all(url: str, docs: list[tuple[str, str]], batch: int) -> tuple[float, dict[str, int]]:
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        for i in range(0, len(docs), batch):
            body = {
                "documents": [
                    {"id": rid, "text": text, "metadata": {"source": rid}}
                    for rid, text in docs[i : i + batch]
                ]
            }
            resp = client.post("/v1/collections/pydoc/documents", json=body)
            resp.raise_for_status()
            for d in resp.json()["documents"]:
                statuses[d["status"]] = statuses.get(d["status"], 0) + 1
        return time.perf_counter() - started, statuses


def search_latencies(url: str) -> list[float]:
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/v1/collections/pydoc/search", json={"query": "warm up"})
        lat = []
        for _ in range(4):
            for q in QUERIES:
                t = time.perf_counter()
                client.post(
                    "/v1/collections/pydoc/search", json={"query": q, "top_k": 5}
                ).raise_for_status()
                lat.append(time.perf_counter() - t)
    return lat


def txtai_run(chunks: list[str], workdir: Path) -> dict:
    from txtai import Embeddings

    from rag_service.settings import bundled_embedding_model

    emb = Embeddings(
        {
            "path": bundled_embedding_model(),
            "method": "sentence-transformers",
            "content": True,
            "backend": "faiss",
            "batch": 64,
            "encodebatch": 64,
        }
    )
    emb.index([("warm", "warm up text", None)])
    started = time.perf_counter()
    emb.index([(f"c{i}", text, None) for i, text in enumerate(chunks)])
    index_s = time.perf_counter() - started
    emb.search("warm up", 5)
    lat = []
    for _ in range(4):
        for q in QUERIES:
            t = time.perf_counter()
            emb.search(q, 5)
            lat.append(time.perf_counter() - t)
    started = time.perf_counter()
    emb.save(str(workdir / "txtai-index"))
    save_s = time.perf_counter() - started
    return {
        "chunks_per_s": round(len(chunks) / index_s, 2),
        "index_seconds": round(index_s, 2),
        "save_seconds": round(save_s, 2),
        "search": percentiles(lat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default="tutorial/", help="python docs subtree to ingest")
    parser.add_argument("--batch", type=int, default=4, help="documents per upsert request")
    parser.add_argument("--skip-txtai", action="store_true")
    args = parser.parse_args()

    docs = corpus(args.prefix)
    chunks = service_chunks(docs)
    baseline = in_process(chunks)
    tmp = Path(tempfile.mkdtemp(prefix="rag-ingest-"))
    try:
        with Server(tmp / "data", {}) as server:
            first_s, first = post_all(server.url, docs, args.batch)
            again_s, again = post_all(server.url, docs, args.batch)
            coll = httpx.get(server.url + "/v1/collections").json()["data"][0]
            ours_search = percentiles(search_latencies(server.url))
        assert coll["chunks"] == len(chunks), (coll["chunks"], len(chunks))
        served = coll["chunks"] / first_s
        figures = {
            "documents": len(docs),
            "chunks": len(chunks),
            "characters": sum(len(t) for _, t in docs),
            "b2_ingest": {
                "in_process_encode_chunks_per_s": round(baseline, 2),
                "service_chunks_per_s": round(served, 2),
                "service_vs_in_process": round(served / baseline, 3),
                "first_ingest_seconds": round(first_s, 2),
                "reingest_unchanged_seconds": round(again_s, 3),
                "reingest_speedup": round(first_s / again_s, 1),
                "first_statuses": first,
                "reingest_statuses": again,
                "targets": {"service_vs_in_process": ">= 0.80", "reingest_speedup": ">= 20"},
            },
            "rag_service_search_http": ours_search,
        }
        if not args.skip_txtai:
            tx = txtai_run(chunks, tmp)
            figures["b6_txtai"] = {
                "txtai": tx,
                "rag_service": {"chunks_per_s": round(served, 2), "search_http": ours_search},
                "ingest_ratio_rag_over_txtai": round(served / tx["chunks_per_s"], 3),
                "search_p50_ratio_rag_http_over_txtai_in_process": round(
                    ours_search["p50_ms"] / tx["search"]["p50_ms"], 3
                ),
                "note": "txtai is in-process and not durable per write; rag-service numbers "
                "include HTTP, SQLite commits and FTS5 indexing",
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_result("b2_b6_ingest", vars(args), figures)


if __name__ == "__main__":
    main()
