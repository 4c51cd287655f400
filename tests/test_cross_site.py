"""An instance without RAG_API_KEY cannot be written from other websites (finding 9 of the
second reliability round): JSON routes need a JSON body, requests from a foreign ``Origin``
are refused, and the ``Host`` header must name the service as it is bound (DNS rebinding),
unless RAG_ALLOWED_HOSTS lists it. With a key none of the origin checks apply."""

from __future__ import annotations

import socket

import pytest

from rag_service.settings import Settings
from rag_service.site_guard import HostRule
from tests.support import error_of

DOC = {"documents": [{"id": "planted", "text": "written from another website"}]}
EVIL = {"Origin": "http://evil.example"}


def _stored(client) -> list[str]:
    return [c["name"] for c in client.get("/v1/collections").json()["data"]]


def test_json_sent_as_text_plain_is_refused(client):
    """A "simple" request (no CORS preflight) cannot carry JSON any more."""
    import json

    resp = client.post(
        "/v1/collections/kb/documents",
        content=json.dumps(DOC),
        headers={"Content-Type": "text/plain", **EVIL},
    )
    assert resp.status_code in (403, 415), resp.text
    resp = client.post(
        "/v1/collections/kb/documents",
        content=json.dumps(DOC),
        headers={"Content-Type": "text/plain"},
    )
    assert resp.status_code == 415, resp.text
    assert "application/json" in error_of(resp)["message"]
    for media in ("application/json; charset=utf-8", "application/merge-patch+json"):
        ok = client.post(
            "/v1/collections/kb/documents", content=json.dumps(DOC), headers={"Content-Type": media}
        )
        assert ok.status_code == 200, (media, ok.text)


def test_requests_from_another_website_are_refused(client):
    resp = client.post("/v1/collections/kb/documents", json=DOC, headers=EVIL)
    assert resp.status_code == 403, resp.text
    assert error_of(resp)["code"] == "foreign_origin"
    files = [("files", ("planted.txt", b"from another website", "text/plain"))]
    resp = client.post("/v1/collections/kb/files", files=files, headers=EVIL)
    assert resp.status_code == 403, resp.text
    resp = client.post("/v1/collections/kb/documents", json=DOC, headers={"Origin": "null"})
    assert resp.status_code == 403, resp.text
    assert _stored(client) == []


def test_same_origin_requests_are_served(client):
    """The playground's own requests carry the service's origin."""
    resp = client.post(
        "/v1/collections/kb/documents", json=DOC, headers={"Origin": "http://127.0.0.1"}
    )
    assert resp.status_code == 200, resp.text
    assert _stored(client) == ["kb"]


@pytest.mark.parametrize("path", ["/v1/collections", "/ready", "/"])
def test_a_host_the_service_is_not_bound_to_is_refused(client, path):
    """DNS rebinding: evil.example pointed at 127.0.0.1 reaches the port with its own name."""
    resp = client.get(path, headers={"Host": "evil.example:8000"})
    assert resp.status_code == 403, resp.text
    error = error_of(resp)
    assert error["code"] == "unknown_host" and "RAG_ALLOWED_HOSTS" in error["message"]


def test_allowed_hosts_lists_more_names(make_client):
    client = make_client(allowed_hosts="kb.example.com, .corp.example")
    for host in ("kb.example.com", "rag.corp.example:8443", "corp.example"):
        resp = client.get("/v1/collections", headers={"Host": host})
        assert resp.status_code == 200, (host, resp.text)
    resp = client.post(
        "/v1/collections/kb/documents", json=DOC, headers={"Origin": "https://kb.example.com"}
    )
    assert resp.status_code == 200, resp.text
    assert client.get("/v1/collections", headers={"Host": "evil.example"}).status_code == 403


def test_a_service_with_a_key_leaves_origins_to_the_key(make_client):
    """A browser cannot add Authorization to a cross-site request without CORS consent."""
    client = make_client(api_key="admin-key")
    auth = {"Authorization": "Bearer admin-key"}
    resp = client.post("/v1/collections/kb/documents", json=DOC, headers={**auth, **EVIL})
    assert resp.status_code == 200, resp.text
    resp = client.get("/v1/collections", headers={**auth, "Host": "rag.example.org"})
    assert resp.status_code == 200, resp.text


def test_host_rule_follows_the_bind_address():
    loopback = HostRule(Settings(host="127.0.0.1"))
    for host in ("localhost", "127.0.0.1", "127.0.0.2", "::1", "app.localhost"):
        assert loopback.allows(host), host
    for host in ("evil.example", "10.0.0.5", "localhost.evil.example", ""):
        assert not loopback.allows(host), host
    bound = HostRule(Settings(host="10.1.2.3"))
    assert bound.allows("10.1.2.3") and not bound.allows("evil.example")
    everywhere = HostRule(Settings(host="0.0.0.0"))
    for host in ("10.0.0.5", "::1", "localhost", socket.gethostname().lower()):
        assert everywhere.allows(host), host
    assert not everywhere.allows("evil.example")
    assert HostRule(Settings(allowed_hosts="*")).allows("anything.example")
