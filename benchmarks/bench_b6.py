"""B6: one corpus, side by side: raw encoders, txtai and rag-service, ingest and search.

Corpus: the first ``--pages`` pages (sorted by path) of the Python 3.11 library reference,
from Debian's python3.11-doc reST sources, cut into pieces: paragraphs (blank-line separated)
merged while they fit, and longer paragraphs cut at a space, into pieces of at most 500 and of
at most 1,000 characters. Every system gets the same pieces.

Who truncates what: sentence-transformers and txtai embed each piece once and truncate it at
the model's window (256 tokens); rag-service truncates nothing: it chunks each piece with its
default chunking (200 tokens, 40 overlap), so a piece over 200 tokens becomes two or more
chunks, all embedded. The figures count pieces per second for everyone (rag-service's chunk
count is recorded beside them), and the pieces over 256 tokens are counted.

Systems, one run, one after the other (nothing else runs meanwhile):

* raw encoders in this process, on every core: ``SentenceTransformer.encode`` at its
  defaults (PyTorch fp32, SDPA attention, batches of 32 sorted by length); the same under bf16
  autocast where the CPU has bf16 instructions; ONNX Runtime fp32 on the graph the service
  exported (length-sorted batches of 32, mean pooling, normalised);
* txtai ``Embeddings`` at its defaults (sentence-transformers, FAISS, content storage): index
  the pieces, then search in-process;
* rag-service over HTTP: ``rag-service serve`` in a child process on the default settings
  (embedded engine), the pieces upserted as documents, 64 per request, two requests in flight
  (``--baseline-tree`` runs another checkout's server on the same pieces in the same run).

Search: HTTP search p50/p99 (one client, top 5, dense) against the 500-character collection,
each query interleaved with an in-process ``SentenceTransformer.encode`` of the same query (the
ratio the issue targets: <= 0.6x), and txtai's in-process search p50. B4: search p99 while a
second client ingests the 1,000-character pieces, against idle. B1: 64 clients posting one text
at a time to /v1/embeddings, texts/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.bench_embedding import _clients, short_texts
from benchmarks.common import Server, percentiles, python_doc_files, write_result

QUERIES = [
    "How do I parse command line arguments?",
    "How can I read a CSV file into dictionaries?",
    "What does the with statement do with a file?",
    "How do I format a date as a string?",
    "How do I run a subprocess and capture its output?",
    "What is the difference between a deque and a list?",
    "How do I sort a list of dictionaries by a key?",
    "How do I match a regular expression at the start of a string?",
    "How do I create a temporary directory?",
    "How do I serialize an object to JSON?",
    "What does functools.lru_cache do?",
    "How do I iterate over the lines of a file?",
    "How do I join paths in a portable way?",
    "How can I measure the execution time of a small snippet?",
    "How do I create a thread pool?",
    "What is a named tuple?",
    "How do I copy a directory tree?",
    "How do I compress a file with gzip?",
    "How are exceptions chained?",
    "How do I get environment variables?",
]


def pieces(limit: int, pages: int) -> list[str]:
    """Paragraph pieces of at most ``limit`` characters (see the module docstring)."""
    docs = [t for rid, t in python_doc_files() if rid.startswith("library/")][:pages]
    out: list[str] = []
    for text in docs:
        current = ""
        for para in (p.strip() for p in text.split("\n\n")):
            if not para:
                continue
            while len(para) > limit:
                if current:
                    out.append(current)
                    current = ""
                cut = para.rfind(" ", 0, limit)
                cut = cut if cut > 0 else limit
                out.append(para[:cut])
                para = para[cut:].strip()
            if current and len(current) + 2 + len(para) > limit:
                out.append(current)
                current = para
            else:
                current = f"{current}\n\n{para}" if current else para
        if current:
            out.append(current)
    return [p for p in out if p.strip()]


# ---- raw encoders, in this process -----------------------------------------------------------
def _st_model() -> Any:
    from sentence_transformers import SentenceTransformer

    from rag_service.settings import bundled_embedding_model

    return SentenceTransformer(bundled_embedding_model(), device="cpu")


def raw_sentence_transformers(model: Any, texts: list[str], bf16: bool = False) -> float:
    import torch

    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with context:
        model.encode(texts[:64])
        started = time.perf_counter()
        model.encode(texts)
    return len(texts) / (time.perf_counter() - started)


def raw_onnx(texts: list[str], cores: int) -> float:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from rag_service.onnx_encoder import GRAPH_FILE, graph_entry
    from rag_service.settings import bundled_embedding_model

    model_dir = Path(bundled_embedding_model())
    entry = graph_entry(model_dir, "embedding")
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores
    session = ort.InferenceSession(str(entry / GRAPH_FILE), options)
    names = [i.name for i in session.get_inputs()]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(256)
    tok.enable_padding()

    def run(batch: list[str]) -> np.ndarray:
        enc = tok.encode_batch(batch)
        feeds = {
            "input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
        }
        hidden = session.run(None, {n: feeds[n] for n in names})[0]
        mask = feeds["attention_mask"][:, :, None].astype(np.float32)
        vectors = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    run([texts[i] for i in order[:32]])
    started = time.perf_counter()
    for i in range(0, len(order), 32):
        run([texts[j] for j in order[i : i + 32]])
    return len(texts) / (time.perf_counter() - started)


# ---- txtai -------------------------------------------------------------------------------------
def txtai_index(texts: list[str]) -> tuple[Any, float]:
    from txtai import Embeddings

    from rag_service.settings import bundled_embedding_model

    emb = Embeddings(path=bundled_embedding_model(), content=True)
    emb.index(["warm up text"])
    started = time.perf_counter()
    emb.index([(f"p{i}", text, None) for i, text in enumerate(texts)])
    return emb, len(texts) / (time.perf_counter() - started)


def txtai_search(emb: Any) -> dict[str, float]:
    for q in QUERIES[:3]:
        emb.search(q, 5)
    lat = []
    for _ in range(5):
        for q in QUERIES:
            t = time.perf_counter()
            emb.search(q, 5)
            lat.append(time.perf_counter() - t)
    return percentiles(lat)


# ---- rag-service -------------------------------------------------------------------------------
def ingest(url: str, collection: str, texts: list[str], batch: int = 64) -> tuple[float, int]:
    """Pieces/s of upserting ``texts`` as documents, two requests in flight; and the chunks
    the service made."""
    bodies = [
        {"documents": [{"id": f"p{i + j}", "text": t} for j, t in enumerate(texts[i : i + batch])]}
        for i in range(0, len(texts), batch)
    ]
    with httpx.Client(base_url=url, timeout=600) as client:

        def post(body: dict[str, Any]) -> None:
            client.post(f"/v1/collections/{collection}/documents", json=body).raise_for_status()

        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(post, bodies))
        seconds = time.perf_counter() - started
        rows = client.get("/v1/collections").json()["data"]
    chunks = next(r["chunks"] for r in rows if r["name"] == collection)
    return len(texts) / seconds, int(chunks)


def search_interleaved(url: str, collection: str, model: Any) -> dict[str, Any]:
    """HTTP search latency, each query followed by an in-process encode of the same query."""
    http, local = [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        body = {"query": "warm up", "top_k": 5}
        for _ in range(5):
            client.post(f"/v1/collections/{collection}/search", json=body)
            model.encode(["warm up"])
        for round_ in range(5):
            for q in QUERIES:
                q = f"{q} ({round_})"  # a new text every time: no query cache hits
                t = time.perf_counter()
                client.post(
                    f"/v1/collections/{collection}/search", json={"query": q, "top_k": 5}
                ).raise_for_status()
                http.append(time.perf_counter() - t)
                t = time.perf_counter()
                model.encode([q])
                local.append(time.perf_counter() - t)
    ours, theirs = percentiles(http), percentiles(local)
    return {
        "http_search": ours,
        "in_process_encode": theirs,
        "http_p50_over_in_process_encode_p50": round(ours["p50_ms"] / theirs["p50_ms"], 3),
    }


def search_during_ingest(url: str, collection: str, texts: list[str]) -> dict[str, Any]:
    """B4: search latency idle, then while another client ingests ``texts``."""

    def latencies(stop: threading.Event | None, n: int) -> list[float]:
        out = []
        with httpx.Client(base_url=url, timeout=60) as client:
            i = 0
            while (stop is None and len(out) < n) or (stop is not None and not stop.is_set()):
                q = f"{QUERIES[i % len(QUERIES)]} [{i}]"
                t = time.perf_counter()
                client.post(f"/v1/collections/{collection}/search", json={"query": q})
                out.append(time.perf_counter() - t)
                i += 1
                time.sleep(0.02)
        return out

    idle = latencies(None, 200)
    stop = threading.Event()
    result: list[list[float]] = []
    searcher = threading.Thread(target=lambda: result.append(latencies(stop, 0)))
    searcher.start()
    rate, _ = ingest(url, "b4-writes", texts)
    stop.set()
    searcher.join()
    during = result[0]
    return {
        "idle": percentiles(idle),
        "during_ingest": percentiles(during),
        "ingest_pieces_per_s_meanwhile": round(rate, 2),
        "p99_ratio": round(percentiles(during)["p99_ms"] / percentiles(idle)["p99_ms"], 3),
        "target": "p99_ratio <= 2.0",
    }


@contextlib.contextmanager
def served(env: dict[str, str], tree: Path | None = None) -> Iterator[Server]:
    tmp = Path(tempfile.mkdtemp(prefix="rag-b6-"))
    server = Server(tmp / "data", env)
    if tree is not None:
        server.cwd = tree
    try:
        with server:
            yield server
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def service_figures(
    short: list[str], long: list[str], model: Any, env: dict[str, str], tree: Path | None
) -> dict[str, Any]:
    with served(env, tree) as server:
        ready = httpx.get(server.url + "/ready").json()
        short_rate, short_chunks = ingest(server.url, "short", short)
        long_rate, long_chunks = ingest(server.url, "long", long)
        search = search_interleaved(server.url, "short", model)
        b4 = search_during_ingest(server.url, "short", long)
        b1_rate, b1 = asyncio.run(_clients(server.url, short_texts(2048), 64))
    return {
        "runtimes": ready.get("runtimes"),
        "ready_seconds": round(server.ready_seconds, 2),
        "short": {"pieces_per_s": round(short_rate, 2), "chunks": short_chunks},
        "long": {"pieces_per_s": round(long_rate, 2), "chunks": long_chunks},
        "search": search,
        "b4": b4,
        "b1": {"texts_per_s": round(b1_rate, 1), "latency": percentiles(b1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=80)
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="another checkout of rag-service whose server also runs the service figures",
    )
    parser.add_argument("--skip-txtai", action="store_true")
    args = parser.parse_args()

    import torch

    from rag_service.batching import available_cores
    from rag_service.runtimes import cpu_has_bf16

    cores = available_cores()
    torch.set_num_threads(cores)
    load_before = os.getloadavg()
    model = _st_model()
    sets = {"short": pieces(500, args.pages), "long": pieces(1000, args.pages)}
    tokens = {
        name: [len(x) for x in model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        for name, texts in sets.items()
    }
    figures: dict[str, Any] = {
        "load_average_before": [round(x, 2) for x in load_before],
        "cores": cores,
        "corpus": {
            name: {
                "pieces": len(texts),
                "mean_characters": round(statistics.mean(len(t) for t in texts), 1),
                "mean_tokens": round(statistics.mean(tokens[name]), 1),
                "pieces_over_256_tokens": sum(n > 256 for n in tokens[name]),
            }
            for name, texts in sets.items()
        },
    }
    raw: dict[str, dict[str, float]] = {}
    for name, texts in sets.items():
        raw[name] = {"sentence_transformers": round(raw_sentence_transformers(model, texts), 2)}
        if cpu_has_bf16():
            raw[name]["sentence_transformers_bf16"] = round(
                raw_sentence_transformers(model, texts, bf16=True), 2
            )
        raw[name]["onnx_runtime"] = round(raw_onnx(texts, cores), 2)
    figures["raw_encode_pieces_per_s"] = raw

    if not args.skip_txtai:
        txtai: dict[str, Any] = {}
        for name, texts in sets.items():
            emb, rate = txtai_index(texts)
            txtai[name] = {"pieces_per_s": round(rate, 2)}
            if name == "short":
                txtai["search"] = txtai_search(emb)
            del emb
        figures["txtai"] = txtai

    env: dict[str, str] = {}
    service = service_figures(sets["short"], sets["long"], model, env, None)
    figures["rag_service"] = service
    if args.baseline_tree:
        figures["rag_service_baseline"] = {
            "tree": str(args.baseline_tree),
            **service_figures(sets["short"], sets["long"], model, env, args.baseline_tree),
        }

    ratios: dict[str, Any] = {}
    for name in sets:
        ours = service[name]["pieces_per_s"]
        ratios[f"{name}_ingest_over_raw_sentence_transformers"] = round(
            ours / raw[name]["sentence_transformers"], 3
        )
        if "txtai" in figures:
            ratios[f"{name}_ingest_over_txtai"] = round(
                ours / figures["txtai"][name]["pieces_per_s"], 3
            )
        if "rag_service_baseline" in figures:
            ratios[f"{name}_ingest_over_baseline"] = round(
                ours / figures["rag_service_baseline"][name]["pieces_per_s"], 3
            )
    ratios["search_p50_over_in_process_encode"] = service["search"][
        "http_p50_over_in_process_encode_p50"
    ]
    if "txtai" in figures:
        ratios["search_p50_over_txtai_search_p50"] = round(
            service["search"]["http_search"]["p50_ms"] / figures["txtai"]["search"]["p50_ms"], 3
        )
    ratios["b4_p99_ratio"] = service["b4"]["p99_ratio"]
    if "rag_service_baseline" in figures:
        ratios["b1_over_baseline"] = round(
            service["b1"]["texts_per_s"] / figures["rag_service_baseline"]["b1"]["texts_per_s"], 3
        )
    figures["ratios"] = ratios
    figures["targets"] = {
        "ingest_over_raw_sentence_transformers": ">= 1.0 (short and long)",
        "ingest_over_txtai": ">= 1.25 (short and long)",
        "search_p50_over_in_process_encode": "<= 0.6",
        "search_p50_over_txtai_search_p50": "< 1.0",
        "b4_p99_ratio": "<= 2.0",
        "b1_over_baseline": ">= 1.0",
    }
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    write_result(
        "b6_side_by_side", vars(args) | {"baseline_tree": str(args.baseline_tree)}, figures
    )
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
