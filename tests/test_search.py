from __future__ import annotations

import pytest

from tests.conftest import error_of
from tests.test_documents import search, upsert

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
