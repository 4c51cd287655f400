"""Regression tests for the second reliability round: requests and files that pinned a core,
held gigabytes, ended in a 500, aliased ids or wrote from another website.

Each test names the finding it covers, by its number in the round's list: JSON nesting (6),
JSONL and file ids (7), dot segments (8), ``$``-anchored patterns (11). The loader bombs
(2-5) are in ``tests/test_loader_limits.py``, cross-site writes (9) in
``tests/test_cross_site.py``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest

from tests.support import error_of

BAD_IDS = [
    "a//b",
    "/lead",
    "trail/",
    "a\u0007b",
    "x" * 513,
    "nl\n",
    "dots/../victim2",
    "./a",
    "a/.",
    "..",
]


def _upload(client: Any, files: list[tuple[str, bytes]], **form: Any) -> Any:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/v1/collections/kb/files", files=parts, data=form)


# ---- 7, 8. one id rule everywhere ------------------------------------------------------------
def test_json_upsert_refuses_every_id_the_rule_refuses(client):
    for bad in BAD_IDS:
        resp = client.post(
            "/v1/collections/kb/documents", json={"documents": [{"id": bad, "text": "x y"}]}
        )
        assert resp.status_code == 400, (bad, resp.text)
        assert error_of(resp)["param"] == "documents[0].id", bad
    assert client.get("/v1/collections").json()["data"] == []


def test_jsonl_upload_refuses_every_id_the_rule_refuses(client):
    """The ids of JSONL lines go through the same rule (they used to be stored as given)."""
    for bad in BAD_IDS:
        line = json.dumps({"id": bad, "text": "some text"})
        resp = _upload(client, [("rows.jsonl", f'{{"text": "fine"}}\n{line}\n'.encode())])
        assert resp.status_code == 400, (bad, resp.text)
        error = error_of(resp)
        assert error["param"] == "files[0]" and "rows.jsonl:2" in error["message"], error
    assert client.get("/v1/collections").json()["data"] == []


def test_file_upload_and_questions_refuse_dot_segments(client):
    client.post(
        "/v1/collections/kb/documents", json={"documents": [{"id": "victim2", "text": "mine"}]}
    ).raise_for_status()
    resp = _upload(client, [("a.txt", b"evil text")], id="dots/../victim2")
    assert resp.status_code == 400 and error_of(resp)["param"] == "id[0]", resp.text
    resp = client.post(
        "/v1/collections/kb/questions",
        json={"questions": [{"question": "who?", "document_id": "dots/../victim2"}]},
    )
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["param"] == "questions[0].document_id"
    assert client.get("/v1/collections/kb/documents/victim2").json()["text"] == "mine"
    listed = client.get("/v1/collections/kb/documents").json()["data"]
    assert [d["id"] for d in listed] == ["victim2"]


def test_ids_the_rule_allows_stay_addressable(client):
    good = ["docs/a.md", "a.b", "..a", "a/..b", "ünï/ß?#%", "x" * 512]
    docs = [{"id": i, "text": f"text of {i[:20]}"} for i in good]
    client.post("/v1/collections/kb/documents", json={"documents": docs}).raise_for_status()
    for doc_id in good:
        got = client.get(f"/v1/collections/kb/documents/{quote(doc_id, safe='/')}")
        assert got.status_code == 200 and got.json()["id"] == doc_id, doc_id


# ---- 11. patterns anchored with \Z -----------------------------------------------------------
def test_a_trailing_newline_passes_no_pattern(client):
    resp = client.post("/v1/collections", json={"name": "kb\n"})
    assert resp.status_code == 400 and error_of(resp)["param"] == "name"
    resp = client.post(
        "/v1/keys", json={"name": "k", "scopes": [{"collection": "colB\n", "access": "read"}]}
    )
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["param"] == "scopes[0].collection"
    client.post(
        "/v1/collections/kb/documents", json={"documents": [{"id": "a", "text": "x y"}]}
    ).raise_for_status()
    resp = client.post("/v1/collections/kb/search", json={"query": "x", "filter": {"team\n": "a"}})
    assert resp.status_code == 400 and error_of(resp)["param"].startswith("filter"), resp.text
    resp = client.post("/v1/adapters", json={"name": "ad\n", "path": "x"})
    assert resp.status_code in (400, 404) and error_of(resp)["param"] == "name", resp.text


# ---- 6. every JSON the service parses is bounded ---------------------------------------------
@pytest.mark.parametrize("depth", [33, 900, 100_000])
def test_upload_metadata_part_follows_the_json_depth_rule(client, depth):
    nested = "[" * depth + "]" * depth
    resp = _upload(client, [("a.txt", b"some text")], metadata=f'{{"deep": {nested}}}')
    assert resp.status_code == 400, resp.text
    error = error_of(resp)
    assert error["param"].startswith("metadata") and "32 levels" in error["message"], error
    assert client.get("/v1/collections").json()["data"] == []


def test_upload_metadata_part_at_the_depth_limit_is_stored(client):
    nested = "[" * 30 + "1" + "]" * 30  # the object and 31 more levels: 32 in all
    resp = _upload(client, [("a.txt", b"some text")], metadata=f'{{"deep": {nested}}}')
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    "line", ["[" * 100_000, '{"text": "x", "metadata": ' + "[" * 40 + "]" * 40 + "}"]
)
def test_jsonl_lines_follow_the_json_depth_rule(client, line):
    resp = _upload(client, [("rows.jsonl", f"{line}\n".encode())])
    assert resp.status_code == 422, resp.text
    error = error_of(resp)
    assert "rows.jsonl:1" in error["message"] and "32 levels" in error["message"], error


# ---- 12. what /ready and /v1/models tell ------------------------------------------------------
def test_ready_says_only_ready_without_the_admin_key(make_client):
    client = make_client(api_key="admin-key")
    plain = client.get("/ready")
    assert plain.status_code == 200 and plain.json() == {"status": "ready"}
    scoped = client.post(
        "/v1/keys",
        json={"name": "reader", "scopes": [{"collection": "*", "access": "read"}]},
        headers={"Authorization": "Bearer admin-key"},
    ).json()["key"]
    assert client.get("/ready", headers={"Authorization": f"Bearer {scoped}"}).json() == {
        "status": "ready"
    }
    full = client.get("/ready", headers={"Authorization": "Bearer admin-key"}).json()
    assert full["status"] == "ready" and {"engine", "collections", "embedding_model"} <= set(full)


def test_models_show_names_and_content_hashes_not_paths(client):
    data = client.get("/v1/models").json()["data"]
    for model in data:
        for key, value in model.items():
            assert not str(value).startswith("/"), (key, value)
    embedding = [m for m in data if m.get("type") == "embedding"]
    assert embedding and all(m["content_hash"].startswith("sha256:") for m in embedding)
    again = client.get("/v1/models").json()["data"]
    assert [m.get("content_hash") for m in again] == [m.get("content_hash") for m in data]


# ---- 10. large embeddings requests are refused before tokenising ------------------------------
def test_embeddings_past_the_token_bound_are_refused_by_a_word_count(make_client, embedder):
    client = make_client(max_embedding_tokens=1000)
    texts = ["the quick brown fox jumps over the lazy dog " * 12] * 16  # 108 words each
    resp = client.post("/v1/embeddings", json={"input": texts})
    assert resp.status_code == 413, resp.text
    error = error_of(resp)
    assert error["param"] == "input" and "at least 1728 tokens" in error["message"], error
    assert "RAG_MAX_EMBEDDING_TOKENS" in error["message"]
    ok = client.post("/v1/embeddings", json={"input": texts[:2]})
    assert ok.status_code == 200, ok.text


def test_token_floor_is_a_lower_bound_of_the_model_count(embedder):
    from rag_service.controllers.embeddings import token_floor

    texts = [
        "plain words here",
        "e.g. x-ray, 3.14 and naïve café — ok",
        "a" * 5000,
        "-- ... !!! ???",
        "\u200b\u200b word\u200b",
        "日本語のテキスト mixed with English",
        "word " * 600,
    ]
    window = embedder.max_seq_length
    for text in texts:
        assert token_floor([text], window) <= embedder.count_tokens([text])[0], text
    assert token_floor(texts, window) > 0


def test_the_published_schema_writes_patterns_for_ecma_262(client):
    """Python anchors (\\A, \\Z) become ^ and $ in /schema/openapi.json, which OpenAPI says
    are ECMA-262 patterns (where $ without the multiline flag is the end of input)."""
    text = client.get("/schema/openapi.json").text
    assert "\\\\Z" not in text and "\\\\A" not in text
    assert '"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"' in text


def test_memory_is_trimmed_after_large_or_long_requests_only():
    """A 1,023-message local chat kept 1.6 GB it had freed: after a request of at least 1 MiB
    or 1 s the allocator's free memory goes back to the OS, on a thread, at most every 2 s
    (benchmarks/bench_hardening.py measures the effect on a served chat)."""
    import time

    from rag_service.memory import Trimmer, trim

    assert trim() is True  # glibc here: malloc_trim exists
    trimmer = Trimmer(min_interval_s=60)
    assert trimmer.after(0.01, 1000) is False  # small and quick: nothing to give back
    assert trimmer.after(2.0, 0) is True  # a long request
    assert trimmer.after(0.01, 5 << 20) is False  # within the interval: not again
    deadline = time.monotonic() + 10
    while trimmer.trims == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert trimmer.trims == 1
    assert trimmer.after_generation(100) is False  # a short prompt frees little
    assert trimmer.after_generation(8000) is True  # always: its cache was freed just now
    deadline = time.monotonic() + 10
    while trimmer.trims < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert trimmer.trims == 2
