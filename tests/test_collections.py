from __future__ import annotations

import pytest

from tests.support import ENGINES, engine_database_url, error_of


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Every test of this module runs on both storage engines."""
    return engine_database_url(request)


def test_create_list_delete(client):
    resp = client.post(
        "/v1/collections", json={"name": "manuals", "chunk_tokens": 64, "chunk_overlap": 8}
    )
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert info["name"] == "manuals"
    assert info["dimension"] == 384
    assert info["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (info["chunk_tokens"], info["chunk_overlap"]) == (64, 8)

    listed = client.get("/v1/collections").json()["data"]
    assert [c["name"] for c in listed] == ["manuals"]
    assert {"name", "documents", "chunks", "embedding_model", "dimension"} <= set(listed[0])
    assert (listed[0]["documents"], listed[0]["chunks"]) == (0, 0)

    assert client.delete("/v1/collections/manuals").status_code == 204
    assert client.get("/v1/collections").json()["data"] == []
    err = error_of(client.delete("/v1/collections/manuals"))
    assert err["code"] == "collection_not_found"


def test_collection_created_on_first_upsert_and_counts(client):
    resp = client.post(
        "/v1/collections/auto/documents",
        json={
            "documents": [
                {"id": "a", "text": "alpha beta gamma"},
                {"id": "b", "text": "delta epsilon"},
            ]
        },
    )
    assert resp.status_code == 200, resp.text
    listed = client.get("/v1/collections").json()["data"]
    assert listed[0]["name"] == "auto"
    assert (listed[0]["documents"], listed[0]["chunks"]) == (2, 2)


def test_duplicate_collection_conflicts(client):
    assert client.post("/v1/collections", json={"name": "x"}).status_code == 201
    resp = client.post("/v1/collections", json={"name": "x"})
    assert resp.status_code == 409
    assert error_of(resp)["param"] == "name"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "bad name!"}, "name"),
        ({"name": ""}, "name"),
        ({}, None),
        ({"name": "x", "index": "NoSuchIndex42"}, "index"),
        ({"name": "x", "index": "IDMap,Flat"}, "index"),
        ({"name": "x", "chunk_tokens": 100000}, "chunk_tokens"),
        ({"name": "x", "chunk_tokens": 1000}, "chunk_tokens"),
        ({"name": "x", "chunk_tokens": 64, "chunk_overlap": 60}, "chunk_overlap"),
        ({"name": "x", "unknown": 1}, None),
    ],
)
def test_create_rejects_bad_input(client, body, param):
    resp = client.post("/v1/collections", json=body)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    assert client.get("/v1/collections").json()["data"] == []


def test_hnsw_collection_searches(client):
    assert client.post("/v1/collections", json={"name": "h", "index": "HNSW32"}).status_code == 201
    docs = [
        {"id": f"d{i}", "text": f"Fact number {i}: the {w} is blue."}
        for i, w in enumerate(["sky", "ocean", "car", "house", "bird"])
    ]
    docs.append({"id": "tree", "text": "Trees grow leaves in spring and lose them in autumn."})
    assert client.post("/v1/collections/h/documents", json={"documents": docs}).status_code == 200
    hits = client.post(
        "/v1/collections/h/search", json={"query": "when do trees lose their leaves", "top_k": 2}
    ).json()
    assert hits["results"][0]["document_id"] == "tree"
    # HNSW cannot delete: deletions are tombstoned and never come back in results.
    assert client.delete("/v1/collections/h/documents/tree").status_code == 204
    hits = client.post(
        "/v1/collections/h/search", json={"query": "when do trees lose their leaves", "top_k": 6}
    ).json()
    assert "tree" not in {r["document_id"] for r in hits["results"]}
    assert len(hits["results"]) == 5


def test_malformed_json_is_400(client):
    resp = client.post(
        "/v1/collections", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert "JSON" in error_of(resp)["message"]


def test_unknown_route_and_method_use_error_shape(client):
    assert error_of(client.get("/v1/nothing-here"))["type"] == "not_found_error"
    resp = client.put("/v1/collections")
    assert resp.status_code == 405
    error_of(resp)
