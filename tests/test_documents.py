from __future__ import annotations

import pytest

from tests.support import ENGINES, engine_database_url, error_of


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Every test of this module runs on both storage engines."""
    return engine_database_url(request)


LONG = " ".join(f"Sentence {i} talks about configuring the widget number {i}." for i in range(120))


def upsert(client, docs, collection="kb"):
    resp = client.post(f"/v1/collections/{collection}/documents", json={"documents": docs})
    assert resp.status_code == 200, resp.text
    return {d["id"]: d for d in resp.json()["documents"]}


def search(client, query, collection="kb", **kw):
    resp = client.post(f"/v1/collections/{collection}/search", json={"query": query, **kw})
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def test_upsert_statuses_and_chunking(client):
    out = upsert(
        client,
        [
            {"id": "long", "text": LONG, "metadata": {"lang": "en"}},
            {"id": "short", "text": "A tiny note."},
        ],
    )
    assert out["long"]["status"] == "created" and out["long"]["chunks"] > 3
    assert out["short"] == {"id": "short", "chunks": 1, "status": "created"}

    again = upsert(client, [{"id": "long", "text": LONG, "metadata": {"lang": "en"}}])
    assert again["long"]["status"] == "unchanged"
    assert again["long"]["chunks"] == out["long"]["chunks"]

    changed = upsert(client, [{"id": "short", "text": "A tiny note, edited."}])
    assert changed["short"]["status"] == "updated"
    doc = client.get("/v1/collections/kb/documents/short").json()
    assert doc["text"] == "A tiny note, edited."
    assert {"id", "text", "metadata", "chunks", "updated_at"} <= set(doc)


def test_chunks_carry_spans_of_the_document(client):
    upsert(client, [{"id": "long", "text": LONG}])
    results = search(client, "configuring widget number 77", top_k=5)
    assert results
    for r in results:
        assert LONG[r["start"] : r["end"]] == r["text"]
        assert r["position"] >= 0
    assert any("widget number 77" in r["text"] for r in results[:2])


def test_metadata_only_change_does_not_reembed(client):
    upsert(
        client, [{"id": "a", "text": "Refunds are issued within 14 days.", "metadata": {"v": 1}}]
    )
    before = search(client, "refund policy")[0]
    out = upsert(
        client, [{"id": "a", "text": "Refunds are issued within 14 days.", "metadata": {"v": 2}}]
    )
    assert out["a"]["status"] == "updated"
    after = search(client, "refund policy")[0]
    assert after["chunk_id"] == before["chunk_id"]  # same row: not re-chunked or re-embedded
    assert after["metadata"] == {"v": 2}
    metrics = client.get("/metrics").text
    assert "rag_chunks_embedded_total 1.0" in metrics


def test_replace_removes_old_chunks(client):
    upsert(client, [{"id": "p", "text": "The office is in Berlin."}])
    upsert(client, [{"id": "p", "text": "The office moved to Lisbon."}])
    results = search(client, "where is the office", top_k=10)
    assert [r["text"] for r in results] == ["The office moved to Lisbon."]
    coll = client.get("/v1/collections").json()["data"][0]
    assert (coll["documents"], coll["chunks"]) == (1, 1)


def test_get_list_paginate_delete(client):
    upsert(
        client,
        [{"id": f"doc-{i:02d}", "text": f"text {i}", "metadata": {"i": i}} for i in range(7)],
    )
    page = client.get("/v1/collections/kb/documents", params={"limit": 3}).json()
    assert [d["id"] for d in page["data"]] == ["doc-00", "doc-01", "doc-02"]
    assert page["has_more"] is True and page["last_id"] == "doc-02"
    assert "text" not in page["data"][0]
    seen = [d["id"] for d in page["data"]]
    while page["has_more"]:
        page = client.get(
            "/v1/collections/kb/documents", params={"limit": 3, "after": page["last_id"]}
        ).json()
        seen += [d["id"] for d in page["data"]]
    assert seen == [f"doc-{i:02d}" for i in range(7)]

    doc = client.get("/v1/collections/kb/documents/doc-03").json()
    assert doc["metadata"] == {"i": 3} and doc["chunks"] == 1
    assert client.delete("/v1/collections/kb/documents/doc-03").status_code == 204
    assert error_of(client.get("/v1/collections/kb/documents/doc-03"))["code"] == (
        "document_not_found"
    )
    assert client.delete("/v1/collections/kb/documents/doc-03").status_code == 404
    assert all(r["document_id"] != "doc-03" for r in search(client, "text 3", top_k=10))


def test_ids_with_slashes(client):
    upsert(client, [{"id": "guides/setup/install.md", "text": "Install with make serve."}])
    doc = client.get("/v1/collections/kb/documents/guides/setup/install.md")
    assert doc.status_code == 200 and doc.json()["id"] == "guides/setup/install.md"
    assert client.delete("/v1/collections/kb/documents/guides/setup/install.md").status_code == 204


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"documents": [{"id": "a", "text": ""}]}, "documents[0].text"),
        ({"documents": [{"id": "a", "text": "   \n "}]}, "documents[0].text"),
        ({"documents": [{"id": "a", "text": 5}]}, "documents[0].text"),
        ({"documents": [{"id": "", "text": "x"}]}, "documents[0].id"),
        ({"documents": [{"text": "x"}]}, "documents[0].id"),
        ({"documents": [{"id": "a", "text": "x", "metadata": [1]}]}, "documents[0].metadata"),
        ({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "documents[1].id"),
        ({"documents": []}, "documents"),
        ({"documents": "nope"}, "documents"),
        ({"docs": []}, None),
        (
            {"documents": [{"id": "ok", "text": "fine"}, {"id": "b", "text": "x" * 5001}]},
            "documents[1].text",
        ),
        ({"documents": [{"id": f"d{i}", "text": "x"} for i in range(11)]}, "documents"),
    ],
)
def test_bad_upserts_write_nothing(make_client, body, param):
    client = make_client(max_document_chars=5000, max_documents_per_request=10)
    upsert(client, [{"id": "keep", "text": "existing document"}], collection="existing")
    for coll in ("existing", "fresh"):
        resp = client.post(f"/v1/collections/{coll}/documents", json=body)
        assert resp.status_code == 400, resp.text
        err = error_of(resp)
        if param is not None:
            assert err["param"] == param, err
    colls = client.get("/v1/collections").json()["data"]
    assert [(c["name"], c["documents"], c["chunks"]) for c in colls] == [("existing", 1, 1)]


def test_unknown_collection_and_document(client):
    assert error_of(client.get("/v1/collections/none/documents"))["code"] == (
        "collection_not_found"
    )
    assert client.get("/v1/collections/none/documents/x").status_code == 404
    assert client.delete("/v1/collections/none/documents/x").status_code == 404
    resp = client.get("/v1/collections/none/documents", params={"limit": 0})
    assert resp.status_code == 400
    assert error_of(resp)["param"] == "limit"


def test_concurrent_upserts_of_the_same_ids_all_succeed(
    tmp_path, embedder, fake_server, database_url
):
    """Clients replacing the same ids at once, with texts that flip between versions: an
    upsert that found a text unchanged and lost the race to one that changed it is embedded
    again instead of failing (the S1 soak saw 500s here), and the store ends consistent."""
    import asyncio

    import httpx

    from rag_service.settings import Settings
    from tests.support import free_port, running_server

    settings = Settings(
        data_dir=tmp_path / "d",
        port=free_port(),
        upstream_url=fake_server.url,
        database_url=database_url,
    )
    texts = ["Version one of the text.", "A second, different version.", "Third version here."]

    async def hammer(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def client_loop(c: int) -> list[int]:
                codes = []
                for i in range(6):  # reads of one client interleave with others' writes
                    docs = [
                        {"id": f"doc{j}", "text": texts[(c + i + j) % 3], "metadata": {"n": i}}
                        for j in range(4)
                    ]
                    resp = await client.post(
                        "/v1/collections/kb/documents", json={"documents": docs}
                    )
                    codes.append(resp.status_code)
                return codes

            runs = await asyncio.gather(*(client_loop(c) for c in range(8)))
            return [code for run in runs for code in run]

    with running_server(settings, embedder) as url:
        assert asyncio.run(hammer(url)) == [200] * 48
        info = httpx.get(f"{url}/v1/collections").json()["data"][0]
        assert info["documents"] == 4 and info["chunks"] == 4
        for j in range(4):
            doc = httpx.get(f"{url}/v1/collections/kb/documents/doc{j}").json()
            assert doc["text"] in texts and doc["chunks"] == 1
