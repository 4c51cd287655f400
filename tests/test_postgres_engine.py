"""The postgres storage engine against a real PostgreSQL (pgserver) with pgvector.

Vectors are random unit vectors of dimension 384 (the engine only stores and ranks them), so
every ranking can be checked against a brute-force numpy ranking.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
import pytest

from indexes.engine import (
    Collection,
    CollectionGone,
    CollectionTaken,
    Engine,
    IndexUnusable,
    StorageError,
    StoreBusy,
    StoreUnavailable,
)
from indexes.postgres import SCHEMA_VERSION, PostgresEngine, SchemaTooNew
from indexes.reindex import ModelChanged
from indexes.types import (
    Chunk,
    CollectionOptions,
    DocumentWrite,
    MetadataFilter,
    SearchQuery,
    canonical_json,
    content_hash,
)

if TYPE_CHECKING:
    from tests.pg import PgCluster

# pg_cluster (session) and pg_url (a fresh database per module) come from tests/pg.py
# through tests/conftest.py.

DIM = 384
MODEL = "test-model"

pytestmark = pytest.mark.timeout(180)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def unit(n: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def options(name: str, index: str = "Flat") -> CollectionOptions:
    return CollectionOptions(name, MODEL, DIM, index)


def doc(
    doc_id: str,
    parts: list[str],
    rng: np.random.Generator,
    metadata: dict[str, Any] | None = None,
    vectors: np.ndarray | None = None,
) -> DocumentWrite:
    """A document whose chunks are ``parts`` (joined by spaces), with random vectors."""
    text = " ".join(parts)
    chunks, start = [], 0
    for i, part in enumerate(parts):
        chunks.append(Chunk(i, start, start + len(part), part))
        start += len(part) + 1
    vecs = unit(len(parts), rng) if vectors is None else vectors
    return DocumentWrite(doc_id, text, metadata or {}, content_hash(text), chunks, vecs)


def meta_only(doc_id: str, text: str, metadata: dict[str, Any]) -> DocumentWrite:
    """A write whose text the caller saw unchanged: no chunks, no vectors."""
    return DocumentWrite(doc_id, text, metadata, content_hash(text), None, None)


def query(vector: np.ndarray, top_k: int = 10, **kw: Any) -> SearchQuery:
    return SearchQuery(kw.pop("text", "query"), vector.reshape(1, -1), top_k, **kw)


@asynccontextmanager
async def opened(url: str, **kw: Any) -> AsyncIterator[PostgresEngine]:
    engine = PostgresEngine(url, **kw)
    await engine.open()
    try:
        yield engine
    finally:
        await engine.close()


def sql_rows(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description is not None else []


async def counters(engine: PostgresEngine, name: str) -> tuple[int, int]:
    """(documents, chunks) of a collection as the database has them now."""
    row = {r.name: r for r in await engine.list()}[name]
    return row.documents, row.chunks


def brute_force(
    vectors: np.ndarray, ids: list[int], q: np.ndarray, k: int
) -> list[tuple[int, float]]:
    scores = vectors @ q
    order = np.argsort(-scores)[:k]
    return [(ids[i], float(scores[i])) for i in order]


# ---- collections ---------------------------------------------------------------------------
def test_create_list_drop_and_index_options(pg_url: str) -> None:
    async def body() -> None:
        async with opened(pg_url) as engine:
            a = await engine.create(options("alpha"))
            await engine.create(options("beta", "HNSW16,ef_construction=40"))
            assert engine.find("alpha") is a
            with pytest.raises(CollectionTaken):
                await engine.create(options("alpha"))
            rows = await engine.list()
            assert [r.name for r in rows] == ["alpha", "beta"]
            assert rows[0].dimension == DIM and rows[0].embedding_model == MODEL
            assert (rows[0].documents, rows[0].chunks) == (0, 0)
            assert rows[1].index_factory == "HNSW16,ef_construction=40"

            for bad in ["IVF256,Flat", "HNSW2", "HNSW16,ef_construction=8", "PQ16", "hnsw16"]:
                with pytest.raises(ValueError, match=r"postgres engine|HNSW"):
                    await engine.create(options(f"bad{len(bad)}", bad))
            assert [r.name for r in await engine.list()] == ["alpha", "beta"]

            await engine.drop("alpha")
            assert engine.find("alpha") is None
            with pytest.raises(CollectionGone):
                engine.get("alpha")
            with pytest.raises(CollectionGone):
                await engine.drop("alpha")
            again = await engine.create(options("alpha"))
            assert again.row.id != a.row.id
            described = engine.describe()
            assert described["engine"] == "postgres" and described["connected"] is True
            assert described["schema_version"] == SCHEMA_VERSION
            assert described["pgvector"].startswith("0.")
            dbname = pg_url.split("?")[0].rsplit("/", 1)[1]
            assert described["database"].endswith("/" + dbname)
            assert "postgres:" not in described["database"]
            assert await engine.ping() is True

    run(body())
    # The dropped collection's chunk partition is detached and dropped in the background.
    tables = {r[0] for r in sql_rows(pg_url, "SELECT tablename FROM pg_tables")}
    live = {f"rag_chunks_{r[0]}" for r in sql_rows(pg_url, "SELECT id FROM rag_collections")}
    assert {t for t in tables if t.startswith("rag_chunks_")} == live


def test_partition_left_by_an_unfinished_drop_is_removed_at_start(pg_url: str) -> None:
    def partitions() -> set[str]:
        rows = sql_rows(pg_url, "SELECT tablename FROM pg_tables WHERE tablename ~ '^rag_chunks_'")
        return {r[0] for r in rows}

    async def create() -> int:
        async with opened(pg_url) as engine:
            return (await engine.create(options("orphan"))).row.id

    cid = run(create())
    # As if the process died right after the drop committed, before its clean-up ran.
    sql_rows(pg_url, "DELETE FROM rag_collections WHERE id = %s", (cid,))
    assert f"rag_chunks_{cid}" in partitions()

    async def start() -> None:
        async with opened(pg_url):
            pass

    run(start())  # close() waits for the sweep that open() started
    assert f"rag_chunks_{cid}" not in partitions()


# ---- writes --------------------------------------------------------------------------------
def test_upsert_statuses_counters_and_metadata_only_update(pg_url: str) -> None:
    rng = np.random.default_rng(1)

    async def body() -> None:
        async with opened(pg_url) as engine:
            d1 = doc("d1", ["one a", "one b"], rng, {"v": 1})
            d2 = doc("d2", ["two a", "two b", "two c"], rng)
            col, out = await engine.upsert_new(options("statuses"), [d1, d2])
            assert out.statuses == {"d1": "created", "d2": "created"}
            assert out.chunk_counts == {"d1": 2, "d2": 3}
            assert (col.row.documents, col.row.chunks) == (2, 5)

            out = await col.upsert([d1, d2])
            assert out.statuses == {"d1": "unchanged", "d2": "unchanged"}
            assert out.chunk_counts == {"d1": 2, "d2": 3}
            assert await col.existing(["d1", "nope"]) == {
                "d1": (d1.content_hash, canonical_json({"v": 1}))
            }

            hits = await col.search(query(d1.vectors[0], 1))  # type: ignore[index]
            chunk_id = hits[0].hit.chunk_id
            # Same text, new metadata (the caller skipped embedding): chunks stay.
            out = await col.upsert([meta_only("d1", d1.text, {"v": 2})])
            assert out.statuses == {"d1": "updated"} and out.chunk_counts == {"d1": 2}
            hits = await col.search(query(d1.vectors[0], 1))  # type: ignore[index]
            assert hits[0].hit.chunk_id == chunk_id and hits[0].hit.metadata == {"v": 2}
            # Same text and metadata sent with fresh chunks: unchanged, nothing rewritten.
            again = doc("d1", ["one a", "one b"], rng, {"v": 2})
            assert (await col.upsert([again])).statuses == {"d1": "unchanged"}
            # 1 and 1.0 are different canonical metadata: an update, as in SQLite.
            out = await col.upsert([meta_only("d2", d2.text, {"n": 1})])
            out = await col.upsert([meta_only("d2", d2.text, {"n": 1.0})])
            assert out.statuses == {"d2": "updated"}
            got = await col.get("d2")
            assert got is not None and got.metadata == {"n": 1.0}
            assert isinstance(got.metadata["n"], float)
            assert await counters(engine, "statuses") == (2, 5)

    run(body())


def test_replace_drops_old_chunks_and_delete(pg_url: str) -> None:
    rng = np.random.default_rng(2)

    async def body() -> None:
        async with opened(pg_url) as engine:
            old = doc("r", ["first part", "second part", "third part"], rng, {"k": "old"})
            keep = doc("keep", ["unrelated"], rng)
            col, _ = await engine.upsert_new(options("replace"), [old, keep])
            old_ids = {h.hit.chunk_id for h in await col.search(query(old.vectors[0], 10))}  # type: ignore[index]
            new = doc("r", ["brand new", "text"], rng, {"k": "new"})
            out = await col.upsert([new])
            assert out.statuses == {"r": "updated"} and out.chunk_counts == {"r": 2}
            assert (col.row.documents, col.row.chunks) == (2, 3)
            hits = await col.search(query(new.vectors[0], 10))  # type: ignore[index]
            assert len(hits) == 3
            assert not old_ids & {h.hit.chunk_id for h in hits if h.hit.document_id == "r"}
            assert sorted(h.hit.text for h in hits if h.hit.document_id == "r") == [
                "brand new",
                "text",
            ]
            got = await col.get("r")
            assert got is not None and got.text == "brand new text" and got.chunks == 2
            assert got.metadata == {"k": "new"} and got.updated_at >= got.created_at

            assert await col.delete("r") is True
            assert await col.delete("r") is False
            assert await col.get("r") is None
            assert (col.row.documents, col.row.chunks) == (1, 1)
            hits = await col.search(query(new.vectors[0], 10))  # type: ignore[index]
            assert [h.hit.document_id for h in hits] == ["keep"]
            assert await counters(engine, "replace") == (1, 1)

    run(body())


def test_get_and_list_pagination_in_byte_order(pg_url: str) -> None:
    rng = np.random.default_rng(3)
    ids = ["b", "a", "B", "é", "z", "a-1", "a_1", "10", "9"]

    async def body() -> None:
        async with opened(pg_url) as engine:
            writes = [doc(i, [f"text of {i}"], rng, {"id": i}) for i in ids]
            col, _ = await engine.upsert_new(options("paging"), writes)
            seen: list[str] = []
            after = None
            while True:
                page, more = await col.list(limit=2, after=after)
                assert len(page) <= 2 and all(d.text == "" for d in page)
                assert all(d.metadata == {"id": d.id} and d.chunks == 1 for d in page)
                seen += [d.id for d in page]
                if not more:
                    break
                after = page[-1].id
            assert seen == sorted(ids, key=lambda s: s.encode())  # SQLite's BINARY order
            got = await col.get("é")
            assert got is not None and got.text == "text of é"
            assert got.content_hash == content_hash("text of é")
            assert await col.get("missing") is None

    run(body())


def test_failed_upsert_writes_nothing(pg_url: str) -> None:
    rng = np.random.default_rng(4)

    async def body() -> None:
        async with opened(pg_url) as engine:
            good = doc("good", ["fine"], rng)
            wrong = doc("wrong", ["bad dims"], rng, vectors=unit(1, rng)[:, :383].copy())
            # The new collection, its partition and the good document: all rolled back.
            with pytest.raises(ValueError, match="dimension 384"):
                await engine.upsert_new(options("never"), [good, wrong])
            assert await engine.lookup("never") is None
            assert "never" not in {r.name for r in await engine.list()}

            col, _ = await engine.upsert_new(options("kept"), [doc("first", ["x"], rng)])
            with pytest.raises(ValueError, match="dimension 384"):
                await col.upsert([good, wrong])
            assert await col.get("good") is None
            with pytest.raises(ValueError, match="NUL"):
                await col.upsert([doc("nul", ["a\x00b"], rng)])
            with pytest.raises(ValueError, match="NUL"):
                await col.upsert([doc("nul", ["ab"], rng, {"k": "\x00"})])
            nan = unit(1, rng)
            nan[0, 0] = np.nan
            with pytest.raises(ValueError):
                await col.upsert([good, doc("nan", ["n"], rng, vectors=nan)])
            assert await counters(engine, "kept") == (1, 1)
            page, _ = await col.list(limit=10, after=None)
            assert [d.id for d in page] == ["first"]
            with pytest.raises(ModelChanged):  # embedded with another model meanwhile: retry
                await engine.upsert_new(
                    CollectionOptions("kept", "another-model", DIM), [doc("y", ["y"], rng)]
                )
            with pytest.raises(IndexUnusable):
                await engine.upsert_new(
                    CollectionOptions("kept", MODEL, DIM + 1), [doc("y", ["y"], rng)]
                )

    run(body())
    assert sql_rows(
        pg_url,
        "SELECT count(*) FROM rag_chunks c JOIN rag_collections k ON k.id = c.collection_id "
        "WHERE k.name = 'kept'",
    ) == [(1,)]


# ---- search --------------------------------------------------------------------------------
def _corpus(engine: PostgresEngine, name: str, rng: np.random.Generator, **kw: Any) -> Any:
    """40 documents of 5 chunks with assorted metadata; returns (collection, vectors, ids,
    metadata per chunk)."""

    async def body() -> Any:
        metas = [
            {"color": ["red", "green", "blue"][i % 3], "n": [1, 1.0, 2, 0][i % 4],
             "flag": [True, False, 1, "true", 0, 1.0][i % 6],
             "tag.x": "a" if i % 5 == 0 else "b"}
            for i in range(40)
        ]  # fmt: skip
        writes = [
            doc(f"doc{i:02d}", [f"chunk {i} {j}" for j in range(5)], rng, metas[i])
            for i in range(40)
        ]
        col, _ = await engine.upsert_new(options(name, **kw), writes)
        hits = await col.search(query(unit(1, rng)[0], 200))
        by_text = {h.hit.text: h.hit.chunk_id for h in hits}
        ids, vecs, chunk_meta = [], [], []
        for w, m in zip(writes, metas, strict=True):
            for c, v in zip(w.chunks or (), w.vectors, strict=True):  # type: ignore[arg-type]
                ids.append(by_text[c.text])
                vecs.append(v)
                chunk_meta.append(m)
        return col, np.stack(vecs), ids, chunk_meta

    return body()


def test_dense_search_equals_brute_force_and_min_score(pg_url: str) -> None:
    rng = np.random.default_rng(5)

    async def body() -> None:
        async with opened(pg_url) as engine:
            col, vecs, ids, _ = await _corpus(engine, "dense", rng)
            for _ in range(5):
                q = unit(1, rng)[0]
                hits = await col.search(query(q, 10))
                want = brute_force(vecs, ids, q, 10)
                assert [h.hit.chunk_id for h in hits] == [cid for cid, _ in want]
                np.testing.assert_allclose([h.score for h in hits], [s for _, s in want], atol=1e-4)
            q = unit(1, rng)[0]
            want = brute_force(vecs, ids, q, 10)
            threshold = want[4][1] - 1e-6
            hits = await col.search(query(q, 10, min_score=threshold))
            assert [h.hit.chunk_id for h in hits] == [cid for cid, _ in want[:5]]
            assert await col.search(query(q, 10, min_score=1.01)) == []

    run(body())


def _sqlite_match(meta: dict[str, Any], key: str, values: tuple[Any, ...]) -> bool:
    """What the embedded engine's filter SQL says about one document's metadata."""
    db = sqlite3.connect(":memory:")
    marks = ",".join("?" * len(values))
    got = db.execute(
        f"SELECT json_extract(?, '$.\"{key}\"') IN ({marks})", (json.dumps(meta), *values)
    ).fetchone()[0]
    return bool(got)


@pytest.mark.parametrize(
    "raw",
    [
        {"color": "red"},
        {"color": {"$in": ["red", "blue"]}},
        {"flag": True},
        {"flag": False},
        {"flag": "true"},
        {"n": 1},
        {"n": 2.0},
        {"n": {"$in": [0, 2]}},
        {"color": "green", "n": 1},
        {"tag.x": "a"},
        {"color": "purple"},
    ],
)
def test_filters_equal_brute_force_with_sqlite_semantics(pg_url: str, raw: dict) -> None:
    rng = np.random.default_rng(6)
    flt = MetadataFilter.parse(raw)
    assert flt is not None

    async def body() -> None:
        async with opened(pg_url) as engine:
            name = f"filters{abs(hash(canonical_json(raw))) % 10**8}"
            col, vecs, ids, metas = await _corpus(engine, name, rng)
            keep = [all(_sqlite_match(m, c.key, c.values) for c in flt.conditions) for m in metas]
            sel = [i for i, k in enumerate(keep) if k]
            q = unit(1, rng)[0]
            hits = await col.search(query(q, 10, filter=flt))
            want = brute_force(vecs[sel], [ids[i] for i in sel], q, 10) if sel else []
            assert [h.hit.chunk_id for h in hits] == [cid for cid, _ in want]
            hybrid = await col.search(query(q, 10, filter=flt, mode="hybrid", text="chunk 7"))
            assert {h.hit.chunk_id for h in hybrid} <= {ids[i] for i in sel}
            await engine.drop(name)

    run(body())


def test_hnsw_with_selective_filter_still_returns_k(pg_cluster: PgCluster) -> None:
    """10 of 2000 chunks match the filter, but their documents are half of all documents, so
    the planner walks the HNSW index and filters afterwards: it finds ef_search (40)
    candidates of which almost none match. The engine notices and ranks the 10 exactly. A
    filter that half of the chunks pass, with ef_search 10, comes back short too, and a
    wider HNSW scan fills it. (A database of its own, so that the planner's statistics are
    those of this corpus.)"""
    rng = np.random.default_rng(7)
    pg_url = pg_cluster.create_database()

    async def body() -> None:
        async with (
            opened(pg_url, ef_search=40) as engine,
            opened(pg_url, ef_search=10, exact_scan_below=100) as narrow,
        ):
            big = [
                doc(
                    f"big{i}",
                    [f"big {i} {j}" for j in range(199)],
                    rng,
                    {"kind": "big", "half": i % 2},
                )
                for i in range(10)
            ]
            small = [
                doc(f"small{i}", [f"small {i}"], rng, {"kind": "small", "half": 1})
                for i in range(10)
            ]
            writes = big + small
            col, _ = await engine.upsert_new(options("hnsw", "HNSW16"), writes)
            sql_rows(pg_url, "ANALYZE rag_documents")
            sql_rows(pg_url, f"ANALYZE rag_chunks_{col.row.id}")
            vecs = np.concatenate([w.vectors for w in small])  # type: ignore[misc]
            texts = [c.text for w in small for c in w.chunks or ()]
            flt = MetadataFilter.parse({"kind": "small"})
            for _ in range(3):
                q = unit(1, rng)[0]
                timings: dict[str, float] = {}
                hits = await col.search(query(q, 10, filter=flt), timings)
                assert [h.hit.text for h in hits] == [texts[i] for i in np.argsort(-(vecs @ q))]
                assert "exact_fallback" in timings  # the case this test is about happened
            # Unfiltered, the index answers alone.
            timings = {}
            assert len(await col.search(query(unit(1, rng)[0], 10), timings)) == 10
            assert "exact_fallback" not in timings and "wide_search" not in timings

            narrow_col = await narrow.lookup("hnsw")
            assert narrow_col is not None
            half = MetadataFilter.parse({"half": 1})
            timings = {}
            hits = await narrow_col.search(query(unit(1, rng)[0], 10, filter=half), timings)
            assert len(hits) == 10 and all(h.hit.metadata["half"] == 1 for h in hits)
            assert "wide_search" in timings and "exact_fallback" not in timings

    run(body())


def test_hybrid_ranks_a_rare_word_first(pg_url: str) -> None:
    rng = np.random.default_rng(8)
    words = ["apple", "river", "stone", "cloud", "music", "garden", "paper", "light"]

    async def body() -> None:
        async with opened(pg_url) as engine:
            parts = [" ".join(rng.choice(words, 6)) for _ in range(30)]
            parts[17] = "stone cloud zyzzyva paper"
            col, _ = await engine.upsert_new(options("hybrid"), [doc("h", parts, rng)])
            q = unit(1, rng)[0]  # says nothing about any chunk
            hits = await col.search(query(q, 5, mode="hybrid", text="what is a Zyzzyva?"))
            assert hits[0].hit.text == "stone cloud zyzzyva paper"
            assert hits[0].score > hits[1].score
            dense = await col.search(query(q, 5))
            assert "zyzzyva" not in dense[0].hit.text
            none = await col.search(query(q, 5, mode="hybrid", text="nothing matches here"))
            assert [h.hit.chunk_id for h in none] == [h.hit.chunk_id for h in dense]

    run(body())


# ---- schema --------------------------------------------------------------------------------
def test_migrations_race_and_newer_schema_refuses(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database()

    async def both() -> None:
        a, b = PostgresEngine(url), PostgresEngine(url)
        await asyncio.gather(a.open(), b.open())
        assert a.describe()["schema_version"] == b.describe()["schema_version"] == SCHEMA_VERSION
        await a.close()
        await b.close()

    run(both())
    versions = sql_rows(url, "SELECT version FROM rag_schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]  # each applied once
    sql_rows(url, "INSERT INTO rag_schema_version VALUES (%s, 'from the future')", (99,))

    async def refused() -> None:
        with pytest.raises(SchemaTooNew, match=f"schema version 99.*{SCHEMA_VERSION}"):
            async with opened(url):
                pass

    run(refused())


def test_missing_pgvector_that_this_user_cannot_add_is_named(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database()
    role = f"limited_{url.split('?')[0].rsplit('/', 1)[1]}"
    sql_rows(url, f"CREATE ROLE {role} LOGIN")
    sql_rows(url, f"GRANT CREATE ON SCHEMA public TO {role}")
    limited = url.replace("postgres:@", f"{role}:@")

    async def body() -> None:
        with pytest.raises(StorageError, match="CREATE EXTENSION vector"):
            async with opened(limited):
                pass

    run(body())


# ---- two replicas --------------------------------------------------------------------------
def test_two_engines_share_collections_documents_and_drops(pg_url: str) -> None:
    rng = np.random.default_rng(9)

    async def body() -> None:
        async with opened(pg_url) as a, opened(pg_url) as b:
            d = doc("shared", ["seen by both"], rng, {"who": "a"})
            col_a, _ = await a.upsert_new(options("replicas"), [d])
            col_b = await b.lookup("replicas")  # at once, from the database
            assert col_b is not None
            got = await col_b.get("shared")
            assert got is not None and got.metadata == {"who": "a"}
            hits = await col_b.search(query(d.vectors[0], 1))  # type: ignore[index]
            assert hits[0].hit.document_id == "shared"
            # The listener brings collections made elsewhere into the cache by itself.
            await a.create(options("made-by-a"))
            assert await _eventually(lambda: b.find("made-by-a") is not None)

            assert await col_b.delete("shared") is True
            assert await col_a.get("shared") is None
            assert await col_a.search(query(d.vectors[0], 1)) == []  # type: ignore[index]

            await b.drop("replicas")
            with pytest.raises(CollectionGone):
                await col_a.upsert([doc("late", ["too late"], rng)])
            with pytest.raises(CollectionGone):
                await col_a.search(query(d.vectors[0], 1))  # type: ignore[index]
            assert a.find("replicas") is None
            assert "replicas" not in {r.name for r in await a.list()}

    run(body())


def test_new_collection_from_two_engines_at_once_and_lock_timeout(pg_url: str) -> None:
    rng = np.random.default_rng(12)

    async def body() -> None:
        async with opened(pg_url) as a, opened(pg_url, lock_timeout=0.3) as b:
            assert isinstance(a, Engine)
            (col_a, out_a), (col_b, out_b) = await asyncio.gather(  # one new name, twice
                a.upsert_new(options("both"), [doc("from-a", ["a"], rng)]),
                b.upsert_new(options("both"), [doc("from-b", ["b"], rng)]),
            )
            assert isinstance(col_a, Collection)
            assert col_a.row.id == col_b.row.id
            assert (out_a.statuses, out_b.statuses) == (
                {"from-a": "created"},
                {"from-b": "created"},
            )
            assert await counters(a, "both") == (2, 2)
            # A writer that waits past lock_timeout (here behind a drop that holds the
            # collection's row) gets StoreBusy, and nothing of its write lands.
            with psycopg.connect(pg_url) as holder:
                holder.execute("SELECT 1 FROM rag_collections WHERE name = 'both' FOR UPDATE")
                with pytest.raises(StoreBusy):
                    await col_b.upsert([doc("blocked", ["b"], rng)])
                holder.rollback()
            assert await col_a.get("blocked") is None
            assert (await col_b.upsert([doc("blocked", ["b"], rng)])).statuses == {
                "blocked": "created"
            }

    run(body())


async def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


def test_concurrent_upserts_of_one_id_from_two_engines_end_consistent(pg_url: str) -> None:
    rng = np.random.default_rng(10)

    async def body() -> None:
        async with opened(pg_url, pool_max=6) as a, opened(pg_url, pool_max=6) as b:
            col_a, _ = await a.upsert_new(options("race"), [doc("other", ["bystander"], rng)])
            col_b = await b.lookup("race")
            assert col_b is not None

            async def writer(col: Any, tag: str, rounds: int) -> None:
                local = np.random.default_rng(abs(hash(tag)) % 2**32)
                for r in range(rounds):
                    n = int(local.integers(1, 6))
                    parts = [f"{tag} round {r} part {j}" for j in range(n)]
                    await col.upsert([doc("x", parts, local, {"tag": tag, "round": r})])

            await asyncio.gather(
                *(writer(col_a, f"a{i}", 8) for i in range(4)),
                *(writer(col_b, f"b{i}", 8) for i in range(4)),
            )
            final = await col_a.get("x")
            assert final is not None
            rows = sql_rows(
                pg_url,
                "SELECT count(*) FROM rag_documents d JOIN rag_collections c "
                "ON c.id = d.collection_id WHERE c.name = 'race' AND d.id = 'x'",
            )
            assert rows == [(1,)]
            texts = sql_rows(
                pg_url,
                "SELECT ch.text FROM rag_chunks ch JOIN rag_documents d ON d.pk = ch.doc_pk "
                "WHERE d.id = 'x' ORDER BY ch.position",
            )
            # Exactly the chunks of the version that won, none left from the others.
            assert [t[0] for t in texts] == [
                f"{final.metadata['tag']} round {final.metadata['round']} part {j}"
                for j in range(final.chunks)
            ]
            assert await counters(b, "race") == (2, 1 + final.chunks)

    run(body())


# ---- the database going away -----------------------------------------------------------------
def test_database_stopped_then_started_engine_recovers_by_itself() -> None:
    from tests.pg import PgCluster  # a server of its own, to stop and start

    cluster = PgCluster()
    rng = np.random.default_rng(11)
    try:
        url = cluster.create_database()

        async def body() -> None:
            async with opened(url, pool_timeout=1.0, connect_timeout=1.0) as engine:
                d = doc("durable", ["kept across a restart"], rng)
                col, _ = await engine.upsert_new(options("restart"), [d])
                cluster.stop()
                # The listener's connection closes with the server: /ready knows at once.
                assert await _eventually(lambda: not engine.describe()["connected"])
                with pytest.raises(StoreUnavailable):
                    await col.search(query(d.vectors[0], 1))  # type: ignore[index]
                with pytest.raises(StoreUnavailable):
                    await col.upsert([doc("lost", ["not written"], rng)])
                with pytest.raises(StoreUnavailable):
                    await engine.list()
                assert await engine.ping(timeout=0.5) is False
                assert engine.describe()["connected"] is False

                cluster.start()
                # Nobody calls in: the listener reconnects, and the state says so.
                assert await _eventually(lambda: engine.describe()["connected"], timeout=30)
                deadline = time.monotonic() + 30
                while not await engine.ping(timeout=1.0):
                    assert time.monotonic() < deadline, "the engine did not reconnect"
                    await asyncio.sleep(0.2)
                assert engine.describe()["connected"] is True
                hits = await col.search(query(d.vectors[0], 1))  # type: ignore[index]
                assert hits[0].hit.document_id == "durable"
                out = await col.upsert([doc("after", ["written after the restart"], rng)])
                assert out.statuses == {"after": "created"}
                assert await col.get("lost") is None
                assert (col.row.documents, col.row.chunks) == (2, 2)

        run(body())
    finally:
        cluster.close()


# ---- adapters ----------------------------------------------------------------------------------
def test_shared_adapter_registry(pg_url: str) -> None:
    async def body() -> None:
        async with opened(pg_url) as a, opened(pg_url) as b:
            rec = await a.adapters_put("tone", "adapters/tone", rank=8, alpha=16.0)
            assert (rec.name, rec.path, rec.version, rec.rank, rec.alpha) == (
                "tone", "adapters/tone", 1, 8, 16.0,
            )  # fmt: skip
            again = await b.adapters_put("tone", "adapters/tone-v2", metadata={"base": "m"})
            assert again.version == 2 and again.loaded_at >= rec.loaded_at
            await b.adapters_put("alpha", "adapters/alpha")
            listed = await a.adapters_list()
            assert [(r.name, r.path, r.metadata) for r in listed] == [
                ("alpha", "adapters/alpha", {}),
                ("tone", "adapters/tone-v2", {"base": "m"}),
            ]
            assert await a.adapters_delete("tone") is True
            assert await b.adapters_delete("tone") is False
            assert [r.name for r in await b.adapters_list()] == ["alpha"]

    run(body())


def test_close_ends_a_listener_that_lost_its_cancellation(pg_url: str) -> None:
    """A cancellation can be swallowed inside a library on Python 3.11 (asyncio.wait_for
    finishing as it is cancelled); close() still ends the listener, in well under its 10 s."""
    swallowed: list[int] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(1)  # the first one is lost, as in the library

    async def body() -> float:
        async with opened(pg_url) as engine:
            assert engine._listener is not None
            engine._listener.cancel()
            with pytest.raises(asyncio.CancelledError):
                await engine._listener
            engine._listener = asyncio.create_task(stubborn())
            await asyncio.sleep(0)
            start = time.monotonic()
        return time.monotonic() - start

    took = run(asyncio.wait_for(body(), 30))
    assert swallowed == [1] and took < 5
