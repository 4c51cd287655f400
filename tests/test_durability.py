"""Crash safety with real processes, and index restore from snapshots plus the store."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.support import (
    BASE_URL,
    code_word,
    error_of,
    free_port,
    ingest_until_killed,
    start_subprocess_server,
    wait_http_ready,
)
from tests.test_documents import search, upsert


def test_kill_9_during_ingest_loses_no_acknowledged_write(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_subprocess_server(data, port, RAG_SNAPSHOT_INTERVAL_S="0.5")
    acknowledged: list[str] = []
    try:
        wait_http_ready(url, proc)
        # Let a snapshot happen after 40 writes, then more writes after it, then kill -9.
        ingest_until_killed(
            url,
            lambda: (proc.send_signal(signal.SIGKILL), proc.wait(timeout=30)),
            acknowledged,
            at_least=40,
            settle_s=0.7,
        )
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(acknowledged) >= 40

    proc = start_subprocess_server(data, port)
    try:
        wait_http_ready(url, proc)
        with httpx.Client(base_url=url, timeout=30) as client:
            ready = client.get("/ready").json()
            report = ready["restore"][0]
            assert report["reembedded"] == 0
            listed = set()
            after = None
            while True:
                page = client.get(
                    "/v1/collections/crash/documents",
                    params={"limit": 1000, **({"after": after} if after else {})},
                )
                body = page.json()
                listed |= {d["id"] for d in body["data"]}
                if not body["has_more"]:
                    break
                after = body["last_id"]
            assert set(acknowledged) <= listed
            coll = client.get("/v1/collections").json()["data"][0]
            assert coll["documents"] == len(listed) and coll["chunks"] == len(listed)
            # Every acknowledged document is searchable through the restored index.
            for doc_id in acknowledged[-5:] + acknowledged[:3]:
                hits = client.post(
                    "/v1/collections/crash/search",
                    json={
                        "query": f"the code word is {code_word(doc_id)}",
                        "top_k": 50,
                        "filter": {},
                    },
                ).json()["results"]
                assert doc_id in {h["document_id"] for h in hits}
            assert (
                report["from_snapshot"] + report["added_from_store"] - (report["removed_stale"])
                == coll["chunks"]
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_restart_restores_snapshot_without_reembedding(make_client, tmp_path):
    data = tmp_path / "store"
    first = make_client(data_dir=data)
    upsert(
        first, [{"id": f"d{i}", "text": f"Paragraph {i} about topic {i % 3}."} for i in range(30)]
    )
    first.__exit__(None, None, None)  # clean shutdown writes the snapshot
    assert (data / "indexes" / "1.faiss").exists()

    second = make_client(data_dir=data)
    report = second.get("/ready").json()["restore"][0]
    assert (report["from_snapshot"], report["added_from_store"]) == (30, 0)
    # Writes after the snapshot, then a restart without a clean shutdown of the index.
    upsert(second, [{"id": "late", "text": "A late addition about zebras."}])
    second.delete("/v1/collections/kb/documents/d0")
    meta = json.loads((data / "indexes" / "1.json").read_text())
    assert meta["meta"]["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    second.app.state["kb"].engine.get("kb").dirty = False  # skip the exit snapshot
    second.__exit__(None, None, None)

    third = make_client(data_dir=data)
    report = third.get("/ready").json()["restore"][0]
    assert report == {
        "collection": "kb",
        "from_snapshot": 30,
        "added_from_store": 1,
        "removed_stale": 1,
        "seconds": report["seconds"],
        "reembedded": 0,
    }
    assert search(third, "zebras")[0]["document_id"] == "late"
    assert all(r["document_id"] != "d0" for r in search(third, "Paragraph 0", top_k=30))


def test_mismatched_snapshot_is_refused_and_rebuilt(make_client, tmp_path):
    data = tmp_path / "store"
    first = make_client(data_dir=data)
    upsert(first, [{"id": "a", "text": "Snapshots record their embedding model."}])
    first.__exit__(None, None, None)
    meta_path = data / "indexes" / "1.json"
    meta = json.loads(meta_path.read_text())
    meta["meta"]["embedding_model"] = "some/other-model"
    meta_path.write_text(json.dumps(meta))

    second = make_client(data_dir=data)
    report = second.get("/ready").json()["restore"][0]
    assert (report["from_snapshot"], report["added_from_store"]) == (0, 1)
    assert search(second, "embedding model")[0]["document_id"] == "a"
    second.__exit__(None, None, None)  # the repaired index is snapshotted on shutdown
    third = make_client(data_dir=data)
    report = third.get("/ready").json()["restore"][0]
    assert (report["from_snapshot"], report["added_from_store"]) == (1, 0)


def test_collection_of_another_embedding_model_is_refused(make_client, tmp_path):
    import sqlite3

    data = tmp_path / "store"
    first = make_client(data_dir=data)
    upsert(first, [{"id": "a", "text": "hello"}])
    first.__exit__(None, None, None)
    with sqlite3.connect(data / "rag.sqlite3") as conn:
        conn.execute(
            "UPDATE collections SET embedding_model = 'BAAI/bge-small-en', dimension = 384"
        )
    second = make_client(data_dir=data)
    for resp in (
        second.post("/v1/collections/kb/search", json={"query": "hello"}),
        second.post("/v1/collections/kb/documents", json={"documents": [{"id": "b", "text": "x"}]}),
    ):
        assert resp.status_code == 409
        err = error_of(resp)
        assert err["code"] == "embedding_mismatch"
        assert "BAAI/bge-small-en" in err["message"] and "all-MiniLM-L6-v2" in err["message"]


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_snapshot_roundtrip_per_index_type(make_client, tmp_path, factory):
    data = tmp_path / factory
    first = make_client(data_dir=data)
    first.post("/v1/collections", json={"name": "kb", "index": factory})
    upsert(
        first,
        [
            {"id": f"d{i}", "text": f"Item {i}: {w}"}
            for i, w in enumerate(["apples", "trains", "violins", "glaciers"])
        ],
    )
    first.delete("/v1/collections/kb/documents/d1")
    before = search(first, "musical instrument", top_k=3)
    first.__exit__(None, None, None)
    second = make_client(data_dir=data)
    after = search(second, "musical instrument", top_k=3)
    assert [r["chunk_id"] for r in after] == [r["chunk_id"] for r in before]
    assert after[0]["document_id"] == "d2"


def test_ready_reports_startup_failure(tmp_path):
    from litestar.testing import TestClient

    from rag_service.app import create_app
    from rag_service.settings import Settings

    app = create_app(
        Settings(
            data_dir=tmp_path,
            embedding_model=str(tmp_path / "nowhere"),
            upstream_url="http://127.0.0.1:9/v1",
        )
    )
    with TestClient(app, base_url=BASE_URL) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            resp = client.get("/ready")
            if "startup failed" in resp.text:
                break
            time.sleep(0.05)
        assert resp.status_code == 503
        assert client.get("/health").json() == {"status": "ok"}
        err = error_of(client.get("/v1/collections"))
        assert err["code"] == "not_ready" and "failed to start" in err["message"]


def test_store_of_an_older_schema_is_migrated(tmp_path):
    """A store written by schema version 1 (before per-collection search defaults) opens, and
    its collections and documents are kept; a store newer than this code is refused."""
    import sqlite3

    from indexes.docstore import _SCHEMA, SCHEMA_VERSION, DocumentStore

    path = tmp_path / "store.db"
    conn = sqlite3.connect(path)  # a file as version 1 made it: its tables, one collection
    conn.executescript(_SCHEMA)
    conn.execute(
        "INSERT INTO collections (name, embedding_model, dimension, index_factory, "
        "chunk_tokens, chunk_overlap, created_at) VALUES ('old', 'm', 4, 'Flat', 200, 40, 0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = DocumentStore(path)
    row = store.get_collection("old")
    assert row is not None and row.search == {} and row.dimension == 4 and row.questions == 0
    assert store.set_search_defaults("old", {"alpha": 0.25}).search == {"alpha": 0.25}  # type: ignore[union-attr]
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        DocumentStore(path)
