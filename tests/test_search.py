from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from tests.support import ENGINES, engine_database_url, error_of
from tests.test_documents import search, upsert


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Every test of this module runs on both storage engines."""
    return engine_database_url(request)


FACTS = [
    ("paris", "Paris is the capital of France and home to the Eiffel Tower.", "geo"),
    ("python", "Python is a programming language created by Guido van Rossum.", "tech"),
    ("rust", "Rust is a systems programming language focused on memory safety.", "tech"),
    ("nile", "The Nile is the longest river in Africa.", "geo"),
    ("err", "Error code XJ-4417 means the flux capacitor needs recalibration.", "support"),
    ("coffee", "Espresso is brewed by forcing hot water through finely ground coffee.", "food"),
]


@pytest.fixture
def kb(client):
    upsert(
        client,
        [
            {"id": i, "text": t, "metadata": {"topic": topic, "n": n}}
            for n, (i, t, topic) in enumerate(FACTS)
        ],
    )
    return client


def test_dense_ranks_relevant_first(kb):
    results = search(kb, "Which programming language did Guido write?", top_k=3)
    assert results[0]["document_id"] == "python"
    assert len(results) == 3
    assert results[0]["score"] >= results[1]["score"] >= results[2]["score"]
    assert set(results[0]) >= {"document_id", "chunk_id", "text", "score", "metadata"}
    assert results[0]["metadata"] == {"topic": "tech", "n": 1}


def test_filter_applies_before_top_k(kb):
    # Every tech document is closer to this query than the food one, yet the filter must
    # still return k results drawn only from the matching documents.
    results = search(kb, "programming languages", top_k=1, filter={"topic": "food"})
    assert [r["document_id"] for r in results] == ["coffee"]
    results = search(
        kb, "programming languages", top_k=3, filter={"topic": {"$in": ["geo", "food"]}}
    )
    assert {r["document_id"] for r in results} == {"paris", "nile", "coffee"}
    assert search(kb, "anything", filter={"topic": "none"}) == []
    results = search(kb, "river", filter={"topic": "geo", "n": 3})
    assert [r["document_id"] for r in results] == ["nile"]


def test_min_score(kb):
    all_results = search(kb, "longest river in Africa", top_k=6)
    assert len(all_results) == 6
    cut = all_results[0]["score"] - 1e-4
    results = search(kb, "longest river in Africa", top_k=6, min_score=cut)
    assert [r["document_id"] for r in results] == ["nile"]


def test_hybrid_finds_exact_tokens(kb):
    results = search(kb, "XJ-4417", top_k=3, mode="hybrid")
    assert results[0]["document_id"] == "err"
    results = search(kb, "capital of France", top_k=2, mode="hybrid", filter={"topic": "geo"})
    assert results[0]["document_id"] == "paris"
    assert all(r["metadata"]["topic"] == "geo" for r in results)


def test_hybrid_bm25_follows_updates_and_deletes(kb):
    upsert(kb, [{"id": "err", "text": "Error code ZQ-9 means the cable is loose."}])
    assert all(
        r["document_id"] != "err" or "ZQ-9" in r["text"]
        for r in search(kb, "XJ-4417", mode="hybrid", top_k=6)
    )
    assert search(kb, "ZQ-9", mode="hybrid")[0]["document_id"] == "err"
    kb.delete("/v1/collections/kb/documents/err")
    assert all(r["document_id"] != "err" for r in search(kb, "ZQ-9", mode="hybrid", top_k=6))


def test_debug_timings(kb):
    resp = kb.post(
        "/v1/collections/kb/search", json={"query": "river", "debug": True, "mode": "hybrid"}
    )
    timings = resp.json()["timings_ms"]
    assert {"embed", "dense", "bm25", "hydrate", "total"} <= set(timings)
    assert "timings_ms" not in kb.post("/v1/collections/kb/search", json={"query": "river"}).json()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": 3}, "query"),
        ({}, None),
        ({"query": "x", "top_k": 0}, "top_k"),
        ({"query": "x", "top_k": 101}, "top_k"),
        ({"query": "x", "mode": "sparse"}, "mode"),
        ({"query": "x", "filter": {"bad key": 1}}, "filter.bad key"),
        ({"query": "x", "filter": {"k": {"$gt": 1}}}, "filter.k"),
        ({"query": "x", "filter": {"k": {"$in": []}}}, "filter.k.$in"),
        ({"query": "x", "filter": {"k": [1, 2]}}, "filter.k"),
        ({"query": "x", "filter": {"k": None}}, "filter.k"),
        ({"query": "x", "min_score": "high"}, "min_score"),
        ({"query": "x" * 9000}, "query"),
    ],
)
def test_bad_search_requests(kb, body, param):
    resp = kb.post("/v1/collections/kb/search", json=body)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    if param is not None:
        assert err["param"] == param, err


def test_search_unknown_collection(client):
    resp = client.post("/v1/collections/missing/search", json={"query": "x"})
    assert resp.status_code == 404
    assert error_of(resp)["code"] == "collection_not_found"


def _search_places(app: Any, monkeypatch: pytest.MonkeyPatch, name: str = "kb") -> list[str]:
    """Where each vector search of the collection ``name`` of ``app`` runs: "loop" (inline, on
    the event loop's thread) or "worker" (a thread with no running event loop). Observed at the
    collection's own vector index, so nothing global is replaced."""
    index = app.state["kb"].engine.get(name).usable_index()
    real = index.search
    places: list[str] = []

    def search(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            places.append("loop")
        except RuntimeError:
            places.append("worker")
        return real(*args, **kwargs)

    monkeypatch.setattr(index, "search", search)
    return places


QUERIES = ["Which programming language did Guido write?", "river in Africa", "XJ-4417"]


def test_small_dense_searches_run_inline_and_match_the_thread_path(
    make_client, tmp_path, monkeypatch, database_url
):
    if database_url:
        pytest.skip("the embedded engine's inline search path")
    docs = [
        {"id": i, "text": t, "metadata": {"topic": topic, "n": n}}
        for n, (i, t, topic) in enumerate(FACTS)
    ]
    inline = make_client(data_dir=tmp_path / "a")
    threaded = make_client(data_dir=tmp_path / "b", inline_search_max_vectors=0)
    for c in (inline, threaded):
        upsert(c, docs)
    on_inline = _search_places(inline.app, monkeypatch)
    on_threaded = _search_places(threaded.app, monkeypatch)
    fast = [search(inline, q, top_k=3) for q in QUERIES]
    assert on_inline == ["loop"] * 3  # dense, unfiltered, 6 vectors: no thread hand-off
    slow = [search(threaded, q, top_k=3) for q in QUERIES]
    assert on_threaded == ["worker"] * 3
    assert fast == slow
    # Filtered and hybrid searches always take a thread.
    on_inline.clear()
    search(inline, "river", filter={"topic": "geo"})
    search(inline, "river", mode="hybrid")
    assert on_inline == ["worker"] * 2
    # So does any search of a collection with known questions: a question hit reads the
    # store (its document's chunk vectors) and may repeat the search deeper.
    attach = {"questions": [{"question": "Who wrote Python?", "document_id": "python"}]}
    for c in (inline, threaded):
        assert c.post("/v1/collections/kb/questions", json=attach).status_code == 200
    on_inline.clear()
    on_threaded.clear()
    assert search(inline, QUERIES[1], top_k=3) == search(threaded, QUERIES[1], top_k=3)
    assert on_inline and set(on_inline) == {"worker"}
    assert on_threaded and set(on_threaded) == {"worker"}


def test_search_waits_for_a_writer_off_the_loop(kb, monkeypatch, database_url):
    if database_url:
        pytest.skip("the embedded engine's readers-writer lock")
    """With a writer holding the collection, a search goes to a thread and waits there."""
    import threading

    places = _search_places(kb.app, monkeypatch)
    rt = kb.app.state["kb"].engine.get("kb")
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with rt.lock.write():
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    held.wait(5)
    threading.Timer(0.3, release.set).start()
    results = search(kb, "river in Africa", top_k=1)
    t.join(5)
    assert results[0]["document_id"] == "nile"
    assert places == ["worker"]


def test_read_nowait(database_url):
    if database_url:
        pytest.skip("no storage involved: once is enough")
    import threading

    from indexes.rwlock import RWLock

    lock = RWLock()
    with lock.read(), lock.read_nowait() as got:
        assert got  # readers share
    entered = threading.Event()
    done = threading.Event()

    def write() -> None:
        with lock.write():
            entered.set()
            done.wait(5)

    t = threading.Thread(target=write)
    t.start()
    entered.wait(5)
    with lock.read_nowait() as got:
        assert not got  # a writer holds it
    done.set()
    t.join(5)
    with lock.read_nowait() as got:
        assert got
    with lock.write():  # released: a writer can still get in
        pass


def test_concurrent_searches_go_to_threads(
    tmp_path, embedder, fake_server, monkeypatch, database_url
):
    if database_url:
        pytest.skip("the embedded engine's inline search path")
    """Queries embedded in one batch come back together: searched inline, one after the
    other, they would stall the loop, so only a lone search runs inline."""
    import httpx

    from rag_service.app import create_app
    from rag_service.settings import Settings
    from tests.support import free_port, serve_app

    settings = Settings(data_dir=tmp_path / "d", port=free_port(), upstream_url=fake_server.url)
    app = create_app(settings, embedder=embedder)
    with serve_app(app, settings.port) as url:
        docs = [{"id": i, "text": t} for i, t, _ in FACTS]
        httpx.post(f"{url}/v1/collections/kb/documents", json={"documents": docs}, timeout=60)
        places = _search_places(app, monkeypatch)

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                resps = await asyncio.gather(
                    *(
                        c.post("/v1/collections/kb/search", json={"query": f"river {i}"})
                        for i in range(8)
                    )
                )
            return [r.status_code for r in resps]

        assert asyncio.run(burst()) == [200] * 8
        # All but a search that may have finished before others came went to a thread.
        assert len(places) == 8 and places.count("worker") >= 6, places
        places.clear()
        assert httpx.post(f"{url}/v1/collections/kb/search", json={"query": "river"}).is_success
        assert places == ["loop"]  # alone again: inline


# ---- weighted hybrid: alpha, fusion, stop words, per-collection defaults ------------------


def _ids(results):
    return [r["document_id"] for r in results]


def test_hybrid_alpha_spans_dense_to_bm25(kb):
    q = "How do I recalibrate after error XJ-4417?"
    dense = search(kb, q, top_k=6)
    # alpha 1: the dense ranking alone, whatever the fusion.
    for fusion in ("convex", "rrf"):
        assert (
            _ids(search(kb, q, top_k=6, mode="hybrid", alpha=1.0, fusion=fusion))[:3]
            == _ids(dense)[:3]
        )
    # alpha 0: BM25 alone puts the only chunk holding the words first, and the scores show
    # what they were made of.
    results = search(kb, q, top_k=3, mode="hybrid", alpha=0.0, debug=True)
    assert results[0]["document_id"] == "err"
    top = results[0]["scores"]
    assert set(top) >= {"dense", "bm25", "fused"} and top["fused"] == results[0]["score"]
    without_words = [r for r in results if r["document_id"] != "err"]
    assert all("bm25" not in r["scores"] for r in without_words)
    assert "scores" not in search(kb, q, top_k=1)[0]  # only with debug
    dense_debug = search(kb, q, top_k=1, debug=True)[0]["scores"]
    assert set(dense_debug) == {"dense"}


def test_bm25_leaves_stop_words_out(client):
    upsert(
        client,
        [
            {"id": "chatty", "text": "What is it that you do and how is it that they do it here?"},
            {"id": "zebra", "text": "Zebras graze on the savanna in large herds."},
        ],
    )
    # Matched on its stop words, "chatty" would rank first on BM25; only "zebra" holds a
    # content word of the question.
    results = search(client, "what is it that a zebra does?", mode="hybrid", alpha=0.0, debug=True)
    assert results[0]["document_id"] == "zebra"
    assert "bm25" not in next(r for r in results if r["document_id"] == "chatty")["scores"]
    # A question of stop words only has no BM25 side: hybrid is then the dense ranking.
    only_stop = search(client, "what is it that they do", mode="hybrid", alpha=0.2, debug=True)
    assert _ids(only_stop) == _ids(search(client, "what is it that they do"))
    assert all("bm25" not in r["scores"] for r in only_stop)


def test_collection_search_defaults(client):
    resp = client.post(
        "/v1/collections", json={"name": "tuned", "search": {"mode": "hybrid", "alpha": 0.0}}
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["search"] == {"mode": "hybrid", "alpha": 0.0}
    upsert(
        client,
        [{"id": i, "text": t} for i, t, _ in FACTS],
        collection="tuned",
    )
    q = "What does error XJ-4417 mean?"
    # No mode in the request: the collection's hybrid with alpha 0 (BM25 decides).
    got = search(client, q, collection="tuned", top_k=3, debug=True)
    assert "bm25" in got[0]["scores"] and got[0]["document_id"] == "err"
    # The request's own values win.
    assert set(search(client, q, collection="tuned", mode="dense", debug=True)[0]["scores"]) == {
        "dense"
    }
    resp = client.patch("/v1/collections/tuned", json={"search": {"fusion": "rrf"}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["search"] == {"fusion": "rrf"}
    listed = {c["name"]: c for c in client.get("/v1/collections").json()["data"]}
    assert listed["tuned"]["search"] == {"fusion": "rrf"}
    assert set(search(client, q, collection="tuned", debug=True)[0]["scores"]) == {"dense"}
    hybrid = search(client, q, collection="tuned", mode="hybrid", alpha=0.5, debug=True)
    assert hybrid[0]["scores"]["fused"] <= 1 / 61 + 1e-6  # weighted RRF: at most 1/(60 + 1)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"search": {"alpha": 1.5}}, "search.alpha"),
        ({"search": {"alpha": -0.1}}, "search.alpha"),
        ({"search": {"fusion": "max"}}, "search.fusion"),
        ({"search": {"mode": "sparse"}}, "search.mode"),
        ({"search": {"rank": 1}}, "search.rank"),
        ({}, "search"),
    ],
)
def test_bad_search_defaults(client, body, param):
    upsert(client, [{"id": "a", "text": "alpha"}])
    resp = client.patch("/v1/collections/kb", json=body)
    assert resp.status_code == 400, resp.text
    assert param in error_of(resp)["param"]
    assert client.get("/v1/collections").json()["data"][0]["search"] == {}
    created = client.post("/v1/collections", json={"name": "other", **body})
    if body:
        assert created.status_code == 400 and param in error_of(created)["param"]
        assert [c["name"] for c in client.get("/v1/collections").json()["data"]] == ["kb"]


def test_search_defaults_of_a_missing_collection(client):
    resp = client.patch("/v1/collections/nope", json={"search": {"alpha": 0.3}})
    assert resp.status_code == 404
    assert error_of(resp)["param"] == "collection"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"alpha": 2}, "alpha"), ({"alpha": "0.5"}, "alpha"), ({"fusion": "sum"}, "fusion")],
)
def test_bad_hybrid_weights(kb, extra, param):
    resp = kb.post("/v1/collections/kb/search", json={"query": "x", "mode": "hybrid", **extra})
    assert resp.status_code == 400
    assert error_of(resp)["param"] == param


def _batches(client) -> float:
    """Embedding batches run so far (the encoder's passes), from /metrics."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("rag_embedding_batch_size_count"):
            return float(line.split()[-1])
    raise AssertionError("no rag_embedding_batch_size_count in /metrics")


def test_a_repeated_query_skips_the_encoder(kb):
    first = search(kb, "Which river is the longest?", top_k=3)
    passes = _batches(kb)
    again = search(kb, "Which river is the longest?", top_k=3)
    assert again == first  # the cached vector finds the same chunks with the same scores
    assert _batches(kb) == passes
    search(kb, "Which river is the longest ?", top_k=3)  # another text: encoded
    assert _batches(kb) == passes + 1


def test_the_query_cache_is_bounded_and_can_be_turned_off():
    from rag_service.embedders import QueryCache

    cache = QueryCache(2)
    for text in ("a", "b", "c"):
        cache.put(text, np.full((1, 2), ord(text), np.float32))
    assert len(cache) == 2 and cache.get("a") is None  # the least recently used went first
    assert cache.get("b") is not None and cache.hits == 1
    cache.put("d", np.zeros((1, 2), np.float32))
    assert cache.get("b") is not None and cache.get("c") is None  # "b" was used, "c" not
    off = QueryCache(0)
    off.put("a", np.zeros((1, 2), np.float32))
    assert len(off) == 0 and off.get("a") is None
