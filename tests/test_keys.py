"""Scoped API keys (/v1/keys): each access level allowed and refused on each kind of route,
chat retrieval scoped to the key's collections, revocation, storage, and /metrics."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

from rag_service.app import create_app
from rag_service.settings import Settings
from tests.support import BASE_URL, error_of, wait_ready

MASTER = "master-s3cret"
DOC = {"documents": [{"id": "d1", "text": "Paris is the capital of France."}]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def issue(client: Any, *scopes: tuple[str, str], auth: str = MASTER) -> tuple[str, str]:
    """Issue a key with ``(collection, access)`` scopes; returns (id, secret)."""
    resp = client.post(
        "/v1/keys",
        json={"name": "test", "scopes": [{"collection": c, "access": a} for c, a in scopes]},
        headers=bearer(auth),
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    return body["id"], body["key"]


@pytest.fixture
def svc(make_client):
    """A keyed service with collections a and b, one document each."""
    client = make_client(api_key=MASTER)
    for name in ("a", "b"):
        resp = client.post(f"/v1/collections/{name}/documents", json=DOC, headers=bearer(MASTER))
        assert resp.status_code == 200, resp.text
    return client


def status(client: Any, key: str, method: str, path: str, body: Any = None) -> int:
    resp = client.request(method, path, json=body, headers=bearer(key))
    if resp.status_code == 403:
        err = error_of(resp)
        assert err["type"] == "permission_error", err
    return int(resp.status_code)


def refused(client: Any, key: str, method: str, path: str, body: Any = None) -> bool:
    return status(client, key, method, path, body) == 403


def test_read_scope(svc):
    _, key = issue(svc, ("a", "read"))
    # allowed: search, list, get on a; embeddings and models with any key
    assert status(svc, key, "POST", "/v1/collections/a/search", {"query": "Paris"}) == 200
    assert status(svc, key, "GET", "/v1/collections/a/documents") == 200
    assert status(svc, key, "GET", "/v1/collections/a/documents/d1") == 200
    assert status(svc, key, "POST", "/v1/embeddings", {"input": "x"}) == 200
    assert status(svc, key, "GET", "/v1/models") == 200
    listed = svc.get("/v1/collections", headers=bearer(key)).json()["data"]
    assert [c["name"] for c in listed] == ["a"]  # b exists but is not this key's
    # refused: reads of b, writes, collection admin, adapters, keys
    assert refused(svc, key, "POST", "/v1/collections/b/search", {"query": "Paris"})
    assert refused(svc, key, "GET", "/v1/collections/b/documents")
    assert refused(svc, key, "GET", "/v1/collections/b/documents/d1")
    assert refused(svc, key, "POST", "/v1/collections/a/documents", DOC)
    assert refused(svc, key, "DELETE", "/v1/collections/a/documents/d1")
    assert refused(svc, key, "POST", "/v1/collections", {"name": "a"})
    assert refused(svc, key, "DELETE", "/v1/collections/a")
    assert refused(svc, key, "POST", "/v1/adapters", {"name": "x", "path": "x"})
    assert refused(svc, key, "DELETE", "/v1/adapters/x")
    assert refused(svc, key, "GET", "/v1/keys")
    assert refused(svc, key, "POST", "/v1/keys", {"name": "n", "scopes": []})
    # a refused read of a missing collection says nothing of whether it exists
    assert refused(svc, key, "GET", "/v1/collections/nope/documents")
    resp = svc.post("/v1/collections/b/search", json={"query": "x"}, headers=bearer(key))
    assert "read access to collection 'b'" in error_of(resp)["message"]
    # the generated OPTIONS answer (which methods a path has) takes any valid key
    assert svc.options("/v1/collections/b/documents", headers=bearer(key)).status_code == 204
    assert svc.options("/v1/collections/b/documents").status_code == 401


def test_write_scope(svc):
    _, key = issue(svc, ("a", "write"), ("fresh", "write"))
    assert status(svc, key, "POST", "/v1/collections/a/documents", DOC) == 200
    assert status(svc, key, "POST", "/v1/collections/a/search", {"query": "Paris"}) == 200
    assert status(svc, key, "GET", "/v1/collections/a/documents/d1") == 200  # write implies read
    assert status(svc, key, "DELETE", "/v1/collections/a/documents/d1") == 204
    # a first upsert creates a collection the key may write to by name
    assert status(svc, key, "POST", "/v1/collections/fresh/documents", DOC) == 200
    assert refused(svc, key, "POST", "/v1/collections/b/documents", DOC)
    assert refused(svc, key, "DELETE", "/v1/collections/b/documents/d1")
    assert refused(svc, key, "POST", "/v1/collections/other/documents", DOC)  # no auto-create
    assert refused(svc, key, "POST", "/v1/collections", {"name": "a2"})
    assert refused(svc, key, "DELETE", "/v1/collections/a")
    assert refused(svc, key, "POST", "/v1/adapters", {"name": "x", "path": "x"})
    assert refused(svc, key, "GET", "/v1/keys")
    names = {c["name"] for c in svc.get("/v1/collections", headers=bearer(MASTER)).json()["data"]}
    assert names == {"a", "b", "fresh"}  # the refused upsert created nothing


def test_collection_admin_scope(svc):
    _, key = issue(svc, ("c", "admin"), ("a", "admin"))
    assert status(svc, key, "POST", "/v1/collections", {"name": "c", "index": "Flat"}) == 201
    assert status(svc, key, "POST", "/v1/collections/c/documents", DOC) == 200
    assert status(svc, key, "DELETE", "/v1/collections/c") == 204
    assert status(svc, key, "DELETE", "/v1/collections/a") == 204
    resp = svc.post("/v1/collections", json={"name": "d"}, headers=bearer(key))
    assert resp.status_code == 403 and error_of(resp)["param"] == "name"
    assert refused(svc, key, "DELETE", "/v1/collections/b")
    assert refused(svc, key, "GET", "/v1/collections/b/documents")
    # admin on some collections is not admin of the service
    assert refused(svc, key, "POST", "/v1/adapters", {"name": "x", "path": "x"})
    assert refused(svc, key, "DELETE", "/v1/adapters/x")
    assert refused(svc, key, "GET", "/v1/keys")
    assert refused(svc, key, "POST", "/v1/keys", {"name": "n", "scopes": []})
    names = {c["name"] for c in svc.get("/v1/collections", headers=bearer(MASTER)).json()["data"]}
    assert names == {"b"}


@pytest.mark.parametrize("admin", ["master", "scoped"])
def test_adapters_and_keys_need_admin_on_every_collection(svc, admin):
    auth = MASTER if admin == "master" else issue(svc, ("*", "admin"))[1]
    # the guard lets these through: the answers are the handlers' own
    resp = svc.post("/v1/adapters", json={"name": "x", "path": "nowhere"}, headers=bearer(auth))
    assert resp.status_code == 400 and error_of(resp)["param"] == "path"
    assert status(svc, auth, "DELETE", "/v1/adapters/x") == 404
    key_id, _ = issue(svc, ("b", "read"), auth=auth)
    assert key_id in [k["id"] for k in svc.get("/v1/keys", headers=bearer(auth)).json()["data"]]
    assert status(svc, auth, "DELETE", f"/v1/keys/{key_id}") == 204
    # and everything below
    assert status(svc, auth, "POST", "/v1/collections", {"name": "e"}) == 201
    assert status(svc, auth, "DELETE", "/v1/collections/b") == 204


def test_wildcard_read_reads_every_collection_and_writes_none(svc):
    _, key = issue(svc, ("*", "read"))
    listed = svc.get("/v1/collections", headers=bearer(key)).json()["data"]
    assert {c["name"] for c in listed} == {"a", "b"}
    for name in ("a", "b"):
        assert status(svc, key, "POST", f"/v1/collections/{name}/search", {"query": "x"}) == 200
        assert refused(svc, key, "POST", f"/v1/collections/{name}/documents", DOC)
    assert refused(svc, key, "GET", "/v1/keys")


def chat(client: Any, key: str, rag: dict[str, Any] | None, stream: bool = False) -> Any:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "stream": stream,
    }
    if rag is not None:
        body["rag"] = rag
    return client.post("/v1/chat/completions", json=body, headers=bearer(key))


def test_chat_retrieves_only_from_readable_collections(svc, fake_upstream):
    _, key = issue(svc, ("a", "read"))
    resp = chat(svc, key, {"collection": "a"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["sources"][0]["document_id"] == "d1"
    sent = len(fake_upstream.requests)
    for rag, stream in (
        ({"collection": "b"}, False),
        ({"collection": "b"}, True),
        ({"collection": "missing"}, False),
        (None, False),  # the default collection, which this key cannot read
        ({"top_k": 2}, False),
    ):
        resp = chat(svc, key, rag, stream)
        assert resp.status_code == 403, (rag, resp.text)
        err = error_of(resp)
        assert err["type"] == "permission_error" and err["param"] == "rag.collection"
    assert len(fake_upstream.requests) == sent  # nothing was sent upstream
    assert chat(svc, key, {"enabled": False}).status_code == 200  # no retrieval, no check
    _, default_reader = issue(svc, ("default", "read"))
    resp = chat(svc, default_reader, None)
    assert resp.status_code == 200 and resp.json()["sources"] == []


def test_revocation_takes_effect_at_once(svc):
    key_id, key = issue(svc, ("a", "read"))
    assert status(svc, key, "GET", "/v1/collections/a/documents") == 200
    assert status(svc, MASTER, "DELETE", f"/v1/keys/{key_id}") == 204
    resp = svc.get("/v1/collections/a/documents", headers=bearer(key))
    assert resp.status_code == 401 and error_of(resp)["type"] == "authentication_error"
    resp = svc.delete(f"/v1/keys/{key_id}", headers=bearer(MASTER))
    assert resp.status_code == 404 and error_of(resp)["type"] == "not_found_error"
    assert svc.get("/v1/keys", headers=bearer(MASTER)).json()["data"] == []


def test_secret_is_shown_once_and_stored_hashed(svc, tmp_path):
    resp = svc.post(
        "/v1/keys",
        json={"name": "ci", "scopes": [{"collection": "a", "access": "write"}]},
        headers=bearer(MASTER),
    )
    created = resp.json()
    secret = created["key"]
    assert secret.startswith("rag-") and len(secret) >= 40
    assert created["hint"] == secret[-4:] and created["id"].startswith("key_")
    listed = svc.get("/v1/keys", headers=bearer(MASTER)).json()["data"]
    assert listed == [
        {
            "id": created["id"],
            "name": "ci",
            "scopes": [{"collection": "a", "access": "write"}],
            "created_at": created["created_at"],
            "hint": secret[-4:],
            "object": "api_key",
        }
    ]
    assert secret not in svc.get("/v1/keys", headers=bearer(MASTER)).text
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert any(p.name.startswith("keys.sqlite3") for p in files)
    for path in files:  # the database, its WAL, snapshots: the secret is nowhere
        assert secret.encode() not in path.read_bytes(), path
    assert status(svc, secret, "GET", "/v1/collections/a/documents") == 200


def test_keys_persist_across_restart(tmp_path, embedder, fake_server):
    settings = Settings(data_dir=tmp_path / "data", api_key=MASTER, upstream_url=fake_server.url)
    with TestClient(create_app(settings, embedder=embedder), base_url=BASE_URL) as first:
        wait_ready(first)
        revoked_id, revoked = issue(first, ("a", "read"))
        _, kept = issue(first, ("a", "write"))
        assert status(first, MASTER, "DELETE", f"/v1/keys/{revoked_id}") == 204
    with TestClient(create_app(settings, embedder=embedder), base_url=BASE_URL) as second:
        wait_ready(second)
        assert status(second, kept, "POST", "/v1/collections/a/documents", DOC) == 200
        assert refused(second, kept, "DELETE", "/v1/collections/a")
        assert status(second, revoked, "GET", "/v1/collections/a/documents") == 401
        assert len(second.get("/v1/keys", headers=bearer(MASTER)).json()["data"]) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "k"}, "scopes"),
        ({"scopes": [{"collection": "a", "access": "read"}]}, "name"),
        ({"name": "", "scopes": [{"collection": "a", "access": "read"}]}, "name"),
        ({"name": "k" * 129, "scopes": [{"collection": "a", "access": "read"}]}, "name"),
        ({"name": "k", "scopes": []}, "scopes"),
        ({"name": "k", "scopes": [{"collection": "a", "access": "read"}] * 65}, "scopes"),
        ({"name": "k", "scopes": [{"collection": "a", "access": "owner"}]}, "scopes[0].access"),
        (
            {"name": "k", "scopes": [{"collection": "a b", "access": "read"}]},
            "scopes[0].collection",
        ),
        ({"name": "k", "scopes": [{"collection": "**", "access": "read"}]}, "scopes[0].collection"),
        ({"name": "k", "scopes": [{"collection": "a"}]}, "scopes[0].access"),
        ({"name": "k", "scopes": [{"collection": "a", "access": "read", "x": 1}]}, "scopes[0].x"),
        ({"name": "k", "scopes": [{"collection": "a", "access": "read"}], "ttl": 5}, "ttl"),
    ],
)
def test_bad_key_request_names_the_field(make_client, body, param):
    client = make_client(api_key=MASTER)
    resp = client.post("/v1/keys", json=body, headers=bearer(MASTER))
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["type"] == "invalid_request_error", err
    # param names the field; a missing or unknown field is named in the message, with param
    # at the object that lacks or holds it
    parent, _, leaf = param.rpartition(".")
    assert err["param"] == param or (
        err["param"] == (parent or None) and f"`{leaf}`" in err["message"]
    ), err
    assert client.get("/v1/keys", headers=bearer(MASTER)).json()["data"] == []


def test_key_management_needs_rag_api_key(make_client):
    client = make_client()  # open service: no admin key, so no keys
    for method, path, body in (
        ("GET", "/v1/keys", None),
        ("POST", "/v1/keys", {"name": "k", "scopes": [{"collection": "a", "access": "read"}]}),
        ("DELETE", "/v1/keys/key_000000000000", None),
    ):
        resp = client.request(method, path, json=body)
        assert resp.status_code == 403, resp.text
        assert "RAG_API_KEY" in error_of(resp)["message"]
    assert client.get("/v1/collections").status_code == 200  # the rest stays open


def test_unknown_or_malformed_key_is_401(svc):
    _, key = issue(svc, ("a", "read"))
    for headers in (
        {},
        bearer(key[:-1] + ("A" if key[-1] != "A" else "B")),
        {"Authorization": key},
        {"Authorization": "Bearer "},
    ):
        resp = svc.get("/v1/collections/a/documents", headers=headers)
        assert resp.status_code == 401, headers
        assert error_of(resp)["type"] == "authentication_error"


def test_metrics_follow_the_key(make_client, tmp_path):
    client = make_client(api_key=MASTER)
    _, reader = issue(client, ("*", "write"))
    _, admin = issue(client, ("*", "admin"))
    resp = client.get("/metrics")
    assert resp.status_code == 401 and error_of(resp)["type"] == "authentication_error"
    assert status(client, reader, "GET", "/metrics") == 403
    for key in (MASTER, admin):
        resp = client.get("/metrics", headers=bearer(key))
        assert resp.status_code == 200 and "rag_http_request_duration_seconds" in resp.text
    public = make_client(api_key=MASTER, metrics_public=True, data_dir=tmp_path / "public")
    assert public.get("/metrics").status_code == 200
    assert public.get("/v1/collections").status_code == 401  # only /metrics is opened


def test_metrics_public_setting_from_env():
    settings = Settings.from_env({"RAG_METRICS_PUBLIC": "true", "RAG_API_KEY": "k"})
    assert settings.metrics_public is True
    assert Settings.from_env({}).metrics_public is False


def test_replicas_on_one_database_share_keys(make_client, tmp_path, pg_cluster):
    """Keys live in the postgres engine's database: a key issued through replica A works on
    replica B, and one revoked through B is refused by A, each within the reload interval."""
    import time

    url = pg_cluster.create_database()
    a = make_client(data_dir=tmp_path / "a", api_key=MASTER, database_url=url)
    b = make_client(data_dir=tmp_path / "b", api_key=MASTER, database_url=url)
    a.post("/v1/collections/kb/documents", json=DOC, headers=bearer(MASTER)).raise_for_status()
    key_id, secret = issue(a, ("kb", "read"))

    def until(client: Any, expected: int) -> None:
        deadline = time.monotonic() + 15
        while (got := status(client, secret, "GET", "/v1/collections/kb/documents")) != expected:
            assert time.monotonic() < deadline, (got, expected)
            time.sleep(0.1)

    until(b, 200)
    assert [k["id"] for k in b.get("/v1/keys", headers=bearer(MASTER)).json()["data"]] == [key_id]
    assert b.delete(f"/v1/keys/{key_id}", headers=bearer(MASTER)).status_code == 204
    assert status(b, secret, "GET", "/v1/collections/kb/documents") == 401  # at once here
    until(a, 401)
    assert not (tmp_path / "a" / "keys.sqlite3").exists()  # nothing kept per replica
