"""The API description and its interactive page, served by the service with no internet."""

from __future__ import annotations

import re


def test_interactive_page_and_its_assets_are_local(make_client):
    client = make_client(api_key="admin-key")  # the docs stay readable without a key
    page = client.get("/schema")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "SwaggerUIBundle" in page.text
    refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert refs and all(ref.startswith("/schema/") for ref in refs), refs
    for ref in refs:
        got = client.get(ref)
        assert got.status_code == 200 and got.content, ref
    spec = client.get("/schema/openapi.json").json()
    paths = set(spec["paths"])
    for path in (
        "/v1/collections/{name}/search",
        "/v1/collections/{name}/reindex",
        "/v1/collections/{name}/questions",
        "/v1/chat/completions",
        "/v1/embeddings",
    ):
        assert path in paths
    assert not any(p.startswith("/schema/assets") for p in paths)
    assert client.get("/schema/assets/nope.js").status_code == 404
