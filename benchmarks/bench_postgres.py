"""B7 the postgres engine against the embedded one, on the same data as B3.

Corpus: B3's (:mod:`benchmarks.bench_search`): sentences of the Python documentation, one chunk
each, really embedded by the bundled model; the 100k scale adds noisy copies of those vectors.
Both engines get the same chunks, vectors, metadata and collection names (``s10k-flat``,
``s10k-hnsw32``, ``s100k-flat``, ``s100k-hnsw32``), and a real PostgreSQL 16 + pgvector
started by ``pgserver`` (as in the tests) holds the postgres side.

* Ingest, store write path: precomputed vectors written through each engine's own API
  (``Engine.upsert_new`` / ``Collection.upsert`` with ``DocumentWrite`` batches of ``--batch``
  documents, one transaction each), so the store is measured without the embedding model.
  HNSW collections: the embedded engine adds to FAISS as it writes. pgvector builds its
  index on insert as well, but at a small fraction of the speed (CPU in its insert path: an
  unlogged table inserts no faster), so the postgres HNSW collections are loaded the way a
  bulk load is done: the collection is created by the engine (with its HNSW index), the index is
  dropped, the chunks are written through the engine, and the very same index definition is
  built again with ``CREATE INDEX`` (timed, ``--maintenance-work-mem``). The insert-time cost
  is measured too: ``--probe`` more chunks upserted into each built HNSW collection, on both
  engines (the steady-state cost of adding to a collection of that size).
* Ingest through HTTP: ``--http-docs`` sentences upserted over HTTP into a fresh collection of
  each engine's server (embedding included, which dominates on a CPU).
* Search: HTTP p50/p99 of ``rag-service serve`` per engine, sequential queries, top_k 10; HNSW
  recall@10 against the exact collection of the same engine (same vectors), and the agreement
  of the two engines' exact results.
* Replicas: ``--clients`` concurrent search clients for ``--duration`` seconds against the
  largest HNSW collection: embedded (one process), postgres with one replica, two replicas
  (two ``serve`` processes on one database, clients split between them) and, when the CLI has
  it, one ``serve --workers 2``.
* Sizes: bytes per chunk of the pgvector HNSW index, the partition's heap and its other
  indexes; the FAISS snapshot and the SQLite file for comparison.

Every step's wall time and the machine's load average before and after it are recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.bench_search import expand, http_latencies, queries, sentences
from benchmarks.common import CACHE, Server, device, percentiles, write_result

INDEXES = ("Flat", "HNSW32")


class Steps:
    """Wall time of each step and the 1-minute load average around it."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        load0 = os.getloadavg()[0]
        t = time.perf_counter()
        print(f"-- {name} (load {load0:.2f})", flush=True)
        try:
            yield
        finally:
            seconds = time.perf_counter() - t
            load1 = os.getloadavg()[0]
            self.log.append(
                {
                    "step": name,
                    "seconds": round(seconds, 1),
                    "loadavg_1m_before": round(load0, 2),
                    "loadavg_1m_after": round(load1, 2),
                }
            )
            print(f"   {seconds:.1f} s (load {load1:.2f})", flush=True)


def collection_name(scale: int, index: str) -> str:
    """B3's names (``s10k-flat``); scales that are not whole thousands keep every digit."""
    size = f"{scale // 1000}k" if scale % 1000 == 0 else str(scale)
    return f"s{size}-{index.lower()}"


def base_vectors(texts: list[str]) -> np.ndarray:
    """B3's base vectors: the bundled model's embeddings of ``texts`` (cached on disk)."""
    from rag_service.embedding import BUNDLED_NAME

    key = hashlib.sha256("\n".join([BUNDLED_NAME, *texts]).encode()).hexdigest()[:16]
    path = CACHE / f"b3-vectors-{len(texts)}-{key}.npy"
    if path.exists():
        return np.load(path)
    from sentence_transformers import SentenceTransformer

    from rag_service.settings import bundled_embedding_model

    model = SentenceTransformer(bundled_embedding_model(), device=device())
    vectors = model.encode(texts, batch_size=64, normalize_embeddings=True).astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def writes(texts: list[str], vectors: np.ndarray, start: int, stop: int, prefix: str) -> list[Any]:
    """B3's documents ``start..stop``: one chunk each, metadata ``{"n": i % 10}``."""
    from indexes.types import Chunk, DocumentWrite, content_hash

    base = len(texts)
    out = []
    for i in range(start, stop):
        src = i % base
        text = texts[src] if i < base else f"{texts[src]} (variant {i // base})"
        out.append(
            DocumentWrite(
                f"{prefix}{i}",
                text,
                {"n": i % 10},
                content_hash(text),
                [Chunk(0, 0, len(text), text)],
                vectors[i][None, :],
            )
        )
    return out


def options(name: str, index: str) -> Any:
    from indexes.types import CollectionOptions
    from rag_service.embedding import BUNDLED_NAME

    return CollectionOptions(
        name=name,
        embedding_model=BUNDLED_NAME,
        dimension=384,
        index=index,
        chunk_tokens=200,
        chunk_overlap=40,
    )


def embedded_engine(data: Path) -> Any:
    from indexes.embedded import EmbeddedEngine

    # The service's defaults: synchronous FULL, efSearch 64.
    return EmbeddedEngine(data, snapshot_interval_s=3600)


async def write_all(engine: Any, name: str, index: str, docs: list[Any], batch: int) -> float:
    """Write ``docs`` into a new collection in transactions of ``batch``; seconds taken."""
    t = time.perf_counter()
    col, _ = await engine.upsert_new(options(name, index), docs[:batch])
    for s in range(batch, len(docs), batch):
        await col.upsert(docs[s : s + batch])
    return time.perf_counter() - t


async def load_embedded(
    data: Path, texts: list[str], vectors: np.ndarray, scales: list[int], batch: int
) -> dict[str, Any]:
    engine = embedded_engine(data)
    await engine.open()
    out: dict[str, Any] = {}
    try:
        for scale in scales:
            docs = writes(texts, vectors, 0, scale, "c")
            for index in INDEXES:
                name = collection_name(scale, index)
                seconds = await write_all(engine, name, index, docs, batch)
                out[name] = {"seconds": round(seconds, 2), "chunks_per_s": round(scale / seconds)}
                print(f"   embedded {name}: {out[name]}", flush=True)
        rows = {r.name: r for r in await engine.list()}
    finally:
        await engine.close()  # writes the FAISS snapshots
    for name, row in rows.items():
        faiss_path, _ = engine.snapshot_paths(row)
        out[name]["faiss_snapshot_bytes_per_chunk"] = round(faiss_path.stat().st_size / row.chunks)
    sqlite = sum(p.stat().st_size for p in data.glob("rag.sqlite3*"))
    out["sqlite_bytes_per_chunk"] = round(sqlite / sum(r.chunks for r in rows.values()))
    return out


async def load_postgres(
    url: str,
    texts: list[str],
    vectors: np.ndarray,
    scales: list[int],
    batch: int,
    maintenance_work_mem: str,
) -> dict[str, Any]:
    import psycopg

    from indexes.postgres import PostgresEngine
    from indexes.postgres.schema import partition_name

    engine = PostgresEngine(url, listen=False)
    await engine.open()
    out: dict[str, Any] = {}
    ddl = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        for scale in scales:
            docs = writes(texts, vectors, 0, scale, "c")
            for index in INDEXES:
                name = collection_name(scale, index)
                if index == "Flat":
                    seconds = await write_all(engine, name, index, docs, batch)
                    out[name] = {
                        "seconds": round(seconds, 2),
                        "chunks_per_s": round(scale / seconds),
                    }
                else:
                    col = await engine.create(options(name, index))
                    hnsw = partition_name(col.row.id) + "_hnsw"
                    cur = await ddl.execute(
                        "SELECT indexdef FROM pg_indexes WHERE indexname = %s", (hnsw,)
                    )
                    found = await cur.fetchone()
                    assert found is not None, f"no index {hnsw}"
                    await ddl.execute(f"DROP INDEX {hnsw}")
                    t = time.perf_counter()
                    for s in range(0, scale, batch):
                        await col.upsert(docs[s : s + batch])
                    load_s = time.perf_counter() - t
                    await ddl.execute(
                        "SELECT set_config('maintenance_work_mem', %s, false)",
                        (maintenance_work_mem,),
                    )
                    t = time.perf_counter()
                    await ddl.execute(found[0])  # the engine's own definition, built in bulk
                    build_s = time.perf_counter() - t
                    out[name] = {
                        "load_without_index_seconds": round(load_s, 2),
                        "create_index_seconds": round(build_s, 2),
                        "seconds": round(load_s + build_s, 2),
                        "chunks_per_s": round(scale / (load_s + build_s)),
                        "index_definition": found[0],
                    }
                print(f"   postgres {name}: {out[name]}", flush=True)
        # What autovacuum does after a bulk insert, done now so it does not run under the
        # measurements: visibility map and planner statistics.
        t = time.perf_counter()
        for row in await engine.list():
            await ddl.execute(f"VACUUM (ANALYZE) {partition_name(row.id)}")
        await ddl.execute("VACUUM (ANALYZE) rag_documents")
        out["vacuum_analyze_seconds"] = round(time.perf_counter() - t, 2)
        for row in await engine.list():
            table = partition_name(row.id)
            cur = await ddl.execute(
                "SELECT pg_relation_size(%s), pg_indexes_size(%s), pg_total_relation_size(%s), "
                "coalesce(pg_relation_size(to_regclass(%s)), 0)",
                (table, table, table, table + "_hnsw"),
            )
            heap, indexes, total, hnsw_bytes = (
                int(v) for v in await cur.fetchone() or (0, 0, 0, 0)
            )
            sizes: dict[str, float] = {
                "heap_bytes_per_chunk": round(heap / row.chunks),
                "indexes_bytes_per_chunk": round(indexes / row.chunks),
                "total_bytes_per_chunk": round(total / row.chunks),
            }
            if hnsw_bytes:
                sizes["hnsw_index_bytes_per_chunk"] = round(hnsw_bytes / row.chunks)
                sizes["hnsw_index_mib"] = round(hnsw_bytes / 2**20, 1)
            out[row.name].update(sizes)
        cur = await ddl.execute(
            "SELECT pg_relation_size('rag_documents') / greatest(count(*), 1) FROM rag_documents"
        )
        out["documents_heap_bytes_per_document"] = int((await cur.fetchone() or (0,))[0])
    finally:
        await ddl.close()
        await engine.close()
    return out


async def probe_inserts(
    engine: Any, texts: list[str], vectors: np.ndarray, scales: list[int], n: int, batch: int
) -> dict[str, Any]:
    """Upsert ``n`` more chunks into each HNSW collection: chunks/s of an insert into an
    existing HNSW collection of that size."""
    await engine.open()
    out: dict[str, Any] = {}
    try:
        for scale in scales:
            name = collection_name(scale, "HNSW32")
            col = engine.get(name)
            docs = writes(texts, vectors, scale, scale + n, "p")
            t = time.perf_counter()
            for s in range(0, n, batch):
                await col.upsert(docs[s : s + batch])
            seconds = time.perf_counter() - t
            out[name] = {
                "chunks": n,
                "seconds": round(seconds, 2),
                "chunks_per_s": round(n / seconds),
            }
            print(f"   {engine.name} {name}: {out[name]}", flush=True)
    finally:
        await engine.close()
    return out


def http_ingest(url: str, texts: list[str], n: int, batch: int) -> dict[str, Any]:
    chunks = 0
    with httpx.Client(base_url=url, timeout=600) as client:
        t = time.perf_counter()
        for s in range(0, n, batch):
            docs = [{"id": f"h{i}", "text": texts[i]} for i in range(s, min(s + batch, n))]
            resp = client.post("/v1/collections/http-ingest/documents", json={"documents": docs})
            resp.raise_for_status()
            chunks += sum(d["chunks"] for d in resp.json()["documents"])
        seconds = time.perf_counter() - t
    return {
        "documents": n,
        "chunks": chunks,
        "seconds": round(seconds, 2),
        "chunks_per_s": round(chunks / seconds, 1),
    }


def search_all(url: str, scales: list[int], qs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scale in scales:
        for index in INDEXES:
            name = collection_name(scale, index)
            lat, ids = http_latencies(url, name, qs)
            out[name] = {"latency": percentiles(lat), "ids": ids}
    return out


def overlap(a: list[list[str]], b: list[list[str]]) -> float:
    return round(
        float(np.mean([len(set(x) & set(y)) / max(len(x), 1) for x, y in zip(a, b, strict=True)])),
        4,
    )


async def _load(
    urls: list[str], collection: str, qs: list[str], clients: int, warmup: float, duration: float
) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        start = time.perf_counter()
        measure, end = start + warmup, start + warmup + duration

        async def worker(i: int) -> None:
            nonlocal errors
            url = f"{urls[i % len(urls)]}/v1/collections/{collection}/search"
            j = i
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    resp = await client.post(url, json={"query": qs[j % len(qs)], "top_k": 10})
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok = False
                done = time.perf_counter()
                if t >= measure and done <= end:
                    if ok:
                        lat.append(done - t)
                    else:
                        errors += 1
                j += clients

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return {
        "requests_per_s": round(len(lat) / duration, 1),
        "errors": errors,
        "latency": percentiles(lat) if lat else None,
    }


def concurrent_search(
    urls: list[str], collection: str, qs: list[str], clients: int, warmup: float, duration: float
) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    result = asyncio.run(_load(urls, collection, qs, clients, warmup, duration))
    result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    result["loadavg_1m_before"] = round(load0, 2)
    print(f"   {len(urls)} url(s): {result}", flush=True)
    return result


def wait_for_pids(url: str, n: int, timeout: float = 120) -> int:
    """Poll /ready on new connections until ``n`` different processes answered it."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(pids) < n and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            resp = httpx.get(url + "/ready", timeout=5)
            if resp.status_code == 200:
                pids.add(int(resp.json()["pid"]))
        time.sleep(0.05)
    return len(pids)


def has_workers_setting() -> bool:
    from rag_service.settings import Settings

    return any(f.name == "workers" for f in dataclasses.fields(Settings))


def pg_facts(url: str) -> dict[str, str]:
    import psycopg

    with psycopg.connect(url) as conn:
        facts = {
            "server_version": str(conn.execute("SHOW server_version").fetchone()[0]),  # type: ignore[index]
            "pgvector": str(
                conn.execute(
                    "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
                ).fetchone()[0]  # type: ignore[index]
            ),
        }
        for name in (
            "shared_buffers",
            "work_mem",
            "maintenance_work_mem",
            "max_parallel_maintenance_workers",
            "synchronous_commit",
            "fsync",
        ):
            facts[name] = str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
    return facts


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=10_000, help="really embedded sentences")
    parser.add_argument("--scales", default="10000,100000", help="chunks per collection")
    parser.add_argument("--queries", type=int, default=200, help="sequential queries per run")
    parser.add_argument("--batch", type=int, default=512, help="documents per upsert")
    parser.add_argument("--probe", type=int, default=1024, help="chunks added to built HNSW")
    parser.add_argument("--http-docs", type=int, default=1024, help="documents upserted by HTTP")
    parser.add_argument("--http-batch", type=int, default=64, help="documents per HTTP upsert")
    parser.add_argument("--clients", type=int, default=32, help="concurrent search clients")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument(
        "--maintenance-work-mem", default="1GB", help="for the bulk HNSW CREATE INDEX"
    )
    args = parser.parse_args(argv)
    scales = sorted(int(s) for s in args.scales.split(","))
    if args.base > scales[0] or args.probe > args.base:
        parser.error("--base must be at most the smallest scale, --probe at most --base")

    from tests.pg import PgCluster

    steps = Steps()
    figures: dict[str, Any] = {"loadavg_at_start": [round(v, 2) for v in os.getloadavg()]}
    with steps.step("embed base sentences (cached after the first run)"):
        texts = sentences(args.base)
        vectors = expand(texts, base_vectors(texts), scales[-1] + args.probe)
    qs = queries(args.queries)
    big = collection_name(scales[-1], "HNSW32")

    tmp = Path(tempfile.mkdtemp(prefix="rag-b7-"))
    cluster = PgCluster()
    try:
        url = cluster.create_database()
        emb_data, pg_data = tmp / "embedded", tmp / "pg"
        with steps.step("embedded: write all collections through the engine"):
            emb_load = asyncio.run(load_embedded(emb_data, texts, vectors, scales, args.batch))
        with steps.step("postgres: write all collections through the engine"):
            pg_load = asyncio.run(
                load_postgres(url, texts, vectors, scales, args.batch, args.maintenance_work_mem)
            )
        figures["postgres"] = pg_facts(url)

        env = {"RAG_SNAPSHOT_INTERVAL_S": "3600"}
        with (
            steps.step("embedded server: search, concurrent search, HTTP ingest"),
            Server(emb_data, env) as server,
        ):
            emb_search = search_all(server.url, scales, qs)
            emb_conc = concurrent_search(
                [server.url], big, qs, args.clients, args.warmup, args.duration
            )
            emb_http = http_ingest(server.url, texts, args.http_docs, args.http_batch)
        pg_env = {**env, "RAG_DATABASE_URL": url}
        replicas: dict[str, Any] = {}
        with (
            steps.step("postgres server: search, 1 and 2 replicas, HTTP ingest"),
            Server(pg_data / "a", pg_env) as a,
        ):
            pg_search = search_all(a.url, scales, qs)
            replicas["1_replica"] = concurrent_search(
                [a.url], big, qs, args.clients, args.warmup, args.duration
            )
            with Server(pg_data / "b", pg_env) as b:
                replicas["2_replicas"] = concurrent_search(
                    [a.url, b.url], big, qs, args.clients, args.warmup, args.duration
                )
            pg_http = http_ingest(a.url, texts, args.http_docs, args.http_batch)
        if has_workers_setting():
            with (
                steps.step("postgres server --workers 2: concurrent search"),
                Server(pg_data / "w", {**pg_env, "RAG_WORKERS": "2"}) as w,
            ):
                seen = wait_for_pids(w.url, 2)
                replicas["workers_2"] = concurrent_search(
                    [w.url], big, qs, args.clients, args.warmup, args.duration
                )
                replicas["workers_2"]["processes_seen"] = seen
        else:
            replicas["workers_2"] = "not measured: this rag-service has no --workers"

        with steps.step("insert probe into the built HNSW collections"):
            from indexes.postgres import PostgresEngine

            emb_probe = asyncio.run(
                probe_inserts(
                    embedded_engine(emb_data), texts, vectors, scales, args.probe, args.batch
                )
            )
            pg_probe = asyncio.run(
                probe_inserts(
                    PostgresEngine(url, listen=False),
                    texts,
                    vectors,
                    scales,
                    args.probe,
                    args.batch,
                )
            )
    finally:
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)

    search: dict[str, Any] = {}
    ingest: dict[str, Any] = {}
    for scale in scales:
        flat, hnsw = collection_name(scale, "Flat"), collection_name(scale, "HNSW32")
        row: dict[str, Any] = {}
        for name in (flat, hnsw):
            e, p = emb_search[name]["latency"], pg_search[name]["latency"]
            row[name] = {
                "embedded": e,
                "postgres": p,
                "p50_postgres_over_embedded": ratio(p["p50_ms"], e["p50_ms"]),
                "p99_postgres_over_embedded": ratio(p["p99_ms"], e["p99_ms"]),
            }
        row["recall_at_10_hnsw_vs_exact"] = {
            "embedded_faiss_hnsw32": overlap(emb_search[flat]["ids"], emb_search[hnsw]["ids"]),
            "postgres_pgvector_hnsw32": overlap(pg_search[flat]["ids"], pg_search[hnsw]["ids"]),
        }
        row["exact_results_agree_across_engines"] = overlap(
            emb_search[flat]["ids"], pg_search[flat]["ids"]
        )
        search[str(scale)] = row
        ingest[str(scale)] = {
            "flat_store_write": {
                "embedded_chunks_per_s": emb_load[flat]["chunks_per_s"],
                "postgres_chunks_per_s": pg_load[flat]["chunks_per_s"],
                "postgres_over_embedded": ratio(
                    pg_load[flat]["chunks_per_s"], emb_load[flat]["chunks_per_s"]
                ),
            },
            "hnsw32_store_write": {
                "embedded_chunks_per_s": emb_load[hnsw]["chunks_per_s"],
                "postgres_bulk_chunks_per_s": pg_load[hnsw]["chunks_per_s"],
                "postgres_bulk_over_embedded": ratio(
                    pg_load[hnsw]["chunks_per_s"], emb_load[hnsw]["chunks_per_s"]
                ),
            },
            "hnsw32_insert_into_built_collection": {
                "embedded_chunks_per_s": emb_probe[hnsw]["chunks_per_s"],
                "postgres_chunks_per_s": pg_probe[hnsw]["chunks_per_s"],
                "postgres_over_embedded": ratio(
                    pg_probe[hnsw]["chunks_per_s"], emb_probe[hnsw]["chunks_per_s"]
                ),
            },
        }
    one, two = replicas["1_replica"], replicas["2_replicas"]
    figures.update(
        {
            "base_sentences": len(texts),
            "search": search,
            "ingest": ingest,
            "ingest_http": {
                "embedded": emb_http,
                "postgres": pg_http,
                "postgres_over_embedded": ratio(pg_http["chunks_per_s"], emb_http["chunks_per_s"]),
            },
            "concurrent_search": {
                "collection": big,
                "clients": args.clients,
                "embedded_1_process": emb_conc,
                **{f"postgres_{k}": v for k, v in replicas.items()},
                "two_replicas_over_one_throughput": ratio(
                    two["requests_per_s"], one["requests_per_s"]
                ),
            },
            "store_detail": {"embedded": emb_load, "postgres": pg_load},
            "insert_probe_detail": {"embedded": emb_probe, "postgres": pg_probe},
            "notes": [
                "postgres HNSW collections: loaded with the index dropped, then the engine's "
                "own index definition rebuilt by CREATE INDEX (bulk); an insert into a built "
                "pgvector HNSW index is measured by the probe instead",
                "embedded engine: synchronous FULL (the service default); postgres: "
                "synchronous_commit on, fsync on (pgserver defaults)",
                "FAISS HNSW32 is built with efConstruction 40, pgvector HNSW32 with "
                "ef_construction 64 (the engine's default for m 32); both search with ef 64",
                "both engines, the servers and the load clients share the machine's cores",
            ],
            "steps": steps.log,
        }
    )
    params = {k: str(v) for k, v in vars(args).items()}
    write_result("b7_postgres", params, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
