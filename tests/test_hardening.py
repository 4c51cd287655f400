"""Regression tests for requests that used to stall the service, grow it or end in a 500.

Each test names the finding it covers: prompt fitting (1), index factory strings (2), bodies
that ended in a 500 (3), large embeddings requests (5), collection names and document ids (8),
OPTIONS and strict types (10).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from indexes.faiss_index import validate_factory
from rag_service.backends.upstream import UpstreamBackend
from rag_service.prompting import PromptSource, fit_prompt
from rag_service.settings import Settings
from tests.fake_upstream import MODEL
from tests.support import error_of, free_port, running_server

DOCS = [
    {"id": "leave", "text": "Employees get 30 days of paid leave per year.", "metadata": {"n": 1}},
    {"id": "parking", "text": "Parking is free in garage B for all staff.", "metadata": {"n": 2}},
]


# ---- 1. prompt fitting -----------------------------------------------------------------------
def _words(messages: list[dict[str, Any]]) -> int:
    return sum(len(str(m["content"]).split()) + 3 for m in messages)


def test_fit_prompt_counts_each_message_once_and_drops_with_arithmetic():
    """1,024 turns that must mostly be dropped: the old loop recounted the whole conversation
    after every dropped turn (about 1,000 full counts); now one batched count of the parts
    and a couple of exact counts."""
    history = []
    for i in range(512):
        history.append({"role": "user", "content": f"question {i} " + "word " * 40})
        history.append({"role": "assistant", "content": f"answer {i} " + "word " * 40})
    history.append({"role": "user", "content": "the last question"})
    sources = [PromptSource(i, f"d{i}", i, "fact " * 30, 1 - i / 10, {}) for i in range(1, 4)]
    exact_calls: list[int] = []
    text_calls: list[int] = []

    def count(messages):
        exact_calls.append(len(messages))
        return _words(messages)

    def count_texts(texts):
        text_calls.append(len(texts))
        return [len(t.split()) + 3 for t in texts]

    out, used = fit_prompt(
        history,
        sources,
        template="S:\n{sources}",
        count_tokens=count,
        count_texts=count_texts,
        budget=500,
        rag=True,
    )
    assert _words(out) <= 500
    assert out[-1]["content"] == "the last question"
    assert used == []  # sources go before any turn
    # The newest turns are kept, the oldest dropped, order preserved.
    kept = [m["content"] for m in out[1:-1]]
    assert kept and kept == [m["content"] for m in history[-1 - len(kept) : -1]]
    assert len(exact_calls) <= 3 and text_calls == [len(sources) + len(history)]


def test_fit_prompt_keeps_going_when_the_parts_under_estimate():
    """Parts that count low (as a real template's joins can) still end within budget."""
    history = [{"role": "user", "content": "word " * 20} for _ in range(30)]

    def count(messages):
        return _words(messages) * 2  # the parts below say half of this

    out, _ = fit_prompt(
        history,
        [],
        template="{sources}",
        count_tokens=count,
        count_texts=lambda texts: [len(t.split()) + 3 for t in texts],
        budget=200,
        rag=False,
    )
    assert count(out) <= 200 and out[-1] is history[-1]


class _ThreadRecordingBackend(UpstreamBackend):
    """The upstream backend, recording which thread counted the prompt."""

    counted_on_loop: list[bool]

    def count_tokens(self, messages):
        try:
            asyncio.get_running_loop()
            self.counted_on_loop.append(True)
        except RuntimeError:  # no event loop in this thread: a worker thread
            self.counted_on_loop.append(False)
        return super().count_tokens(messages)


def test_long_conversation_is_fitted_off_the_event_loop(make_client, fake_upstream, embedder):
    settings = Settings(upstream_url=fake_upstream.url, upstream_model=MODEL)
    backend = _ThreadRecordingBackend(
        settings,
        client=httpx.AsyncClient(base_url=fake_upstream.url),
        count_text_tokens=lambda t: len(embedder.tokenizer.encode(t, add_special_tokens=False).ids),
    )
    backend.counted_on_loop = []
    client = make_client(backend=backend, context_window=4096)
    long_chat = [{"role": "user", "content": "word " * 400} for _ in range(60)]
    resp = client.post("/v1/chat/completions", json={"messages": long_chat, "max_tokens": 16})
    assert resp.status_code == 200, resp.text
    sent = fake_upstream.requests[-1]["messages"]
    assert 1 < len(sent) < 61  # old turns were dropped to fit 4096 tokens
    assert backend.counted_on_loop and not any(backend.counted_on_loop)


def test_chat_past_the_character_limit_is_413_naming_the_limit(make_client, fake_upstream):
    client = make_client(max_chat_chars=10_000)
    messages = [{"role": "user", "content": "x" * 4000} for _ in range(3)]
    resp = client.post("/v1/chat/completions", json={"messages": messages})
    assert resp.status_code == 413
    err = error_of(resp)
    assert err["param"] == "messages" and "RAG_MAX_CHAT_CHARS" in err["message"]
    assert fake_upstream.requests == []


# ---- 2. index factory strings ----------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        "IVF99999999,Flat",
        "IVF0,Flat",
        "HNSW100000",
        "HNSW2",
        "IVF256,PQ7",  # 7 does not divide 384
        "IVF256,PQ16x16",
        "PQ16x13",
        "IVF256",
        "LSH",
        "HNSW32,Flat,Refine(Flat)",
        "IDMap,Flat",
    ],
)
def test_factory_grammar_refuses_unbounded_or_unknown(bad):
    with pytest.raises(ValueError):
        validate_factory(bad, 384)


@pytest.mark.parametrize(
    "good", ["Flat", "HNSW32", "HNSW16,SQ8", "IVF256,Flat", "IVF1024,PQ16x8", "IVF64_HNSW32,SQ8"]
)
def test_factory_grammar_accepts_the_families_it_names(good):
    validate_factory(good, 384)


def test_huge_ivf_is_refused_before_anything_is_built_or_written(client):
    resp = client.post("/v1/collections", json={"name": "big", "index": "IVF99999999,Flat"})
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["param"] == "index" and "65536" in err["message"]
    assert client.get("/v1/collections").json()["data"] == []
    ok = client.post("/v1/collections", json={"name": "ivf", "index": "IVF64,Flat"})
    assert ok.status_code == 201, ok.text


# ---- 3. bodies that ended in a 500 -----------------------------------------------------------
JSON_ROUTES = [
    "/v1/collections",
    "/v1/collections/kb/documents",
    "/v1/collections/kb/search",
    "/v1/embeddings",
    "/v1/chat/completions",
    "/v1/adapters",
]


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_deep_nesting_and_invalid_utf8_are_400_on_every_json_route(client, path):
    deep = b'{"query": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    for body, words in (
        (deep, "nests deeper"),
        (b'{"query": "\xff\xfe"}', "UTF-8"),
        (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper"),
    ):
        resp = client.post(path, content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 400, (path, resp.text)
        assert words in error_of(resp)["message"]


def test_integers_past_64_bits_are_400_naming_the_field(client, fake_upstream):
    client.post("/v1/collections/kb/documents", json={"documents": DOCS}).raise_for_status()
    resp = client.post("/v1/collections/kb/search", json={"query": "q", "filter": {"n": 2**70}})
    assert resp.status_code == 400 and error_of(resp)["param"] == "filter.n"
    resp = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "rag": {"collection": "kb", "filter": {"n": {"$gt": -(2**64)}}},
        },
    )
    assert resp.status_code == 400 and error_of(resp)["param"] == "rag.filter.n.$gt"
    resp = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "seed": 2**70},
    )
    assert resp.status_code == 400 and error_of(resp)["param"] == "seed"
    assert fake_upstream.requests == []
    # In range, the same filter works.
    resp = client.post("/v1/collections/kb/search", json={"query": "q", "filter": {"n": 2**62}})
    assert resp.status_code == 200 and resp.json()["results"] == []


# ---- 5. large embeddings requests ------------------------------------------------------------
def test_embeddings_past_the_token_cap_is_413(make_client):
    client = make_client(max_embedding_tokens=1000)
    resp = client.post("/v1/embeddings", json={"input": ["word " * 100] * 12})
    assert resp.status_code == 413
    err = error_of(resp)
    assert err["param"] == "input" and "RAG_MAX_EMBEDDING_TOKENS" in err["message"]
    assert client.post("/v1/embeddings", json={"input": ["word " * 100] * 3}).status_code == 200


def test_a_search_does_not_wait_behind_a_large_embeddings_request(tmp_path, embedder, fake_server):
    """The large request is encoded on the bulk lane in small batches; a search that arrives
    after it started finishes long before it (on one lane it waited for all of it)."""
    settings = Settings(data_dir=tmp_path, port=free_port(), upstream_url=fake_server.url)
    # About 60k tokens: several seconds of encoding, so the search lands in the middle of it.
    big = [f"passage {i} " + "lorem ipsum dolor sit amet " * 60 for i in range(200)]

    async def run(url: str) -> list[str]:
        finished: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            (
                await http.post("/v1/collections/kb/documents", json={"documents": DOCS})
            ).raise_for_status()

            async def embed_big() -> None:
                resp = await http.post("/v1/embeddings", json={"input": big})
                assert resp.status_code == 200 and len(resp.json()["data"]) == 200
                finished.append("embeddings")

            async def search() -> None:
                await asyncio.sleep(0.5)  # the large request is being encoded by now
                resp = await http.post("/v1/collections/kb/search", json={"query": "parking"})
                assert resp.json()["results"][0]["document_id"] == "parking"
                finished.append("search")

            await asyncio.gather(embed_big(), search())
        return finished

    with running_server(settings, embedder) as url:
        assert asyncio.run(run(url)) == ["search", "embeddings"]


# ---- 8. collection names and document ids ----------------------------------------------------
@pytest.mark.parametrize("name", [" space ", "a\u0000b", "\u202eevil", "x" * 5000, "-lead", "a b"])
def test_upsert_refuses_names_that_create_refuses(client, name):
    created = client.post("/v1/collections", json={"name": name})
    assert created.status_code == 400
    resp = client.post(
        f"/v1/collections/{quote(name, safe='')}/documents", json={"documents": DOCS}
    )
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["param"] == "name"
    assert client.get("/v1/collections").json()["data"] == []


def test_document_ids_are_addressable_or_refused(client):
    resp = client.post(
        "/v1/collections/kb/documents", json={"documents": [{"id": "/abs", "text": "x y"}]}
    )
    assert resp.status_code == 400 and error_of(resp)["param"] == "documents[0].id"
    resp = client.post(
        "/v1/collections/kb/documents", json={"documents": [{"id": "a\u0007b", "text": "x y"}]}
    )
    assert resp.status_code == 400 and error_of(resp)["param"] == "documents[0].id"
    assert client.get("/v1/collections").json()["data"] == []
    for bad in ("dir/", "a//b"):  # routing drops those slashes: the id could not be read
        resp = client.post(
            "/v1/collections/kb/documents", json={"documents": [{"id": bad, "text": "x y"}]}
        )
        assert resp.status_code == 400 and error_of(resp)["param"] == "documents[0].id"
    odd = ["docs/guides/vpn.md", "with space", "ünï/ß?#%", "a/b/c", "x"]
    docs = [{"id": i, "text": f"text of {i}"} for i in odd]
    client.post("/v1/collections/kb/documents", json={"documents": docs}).raise_for_status()
    for doc_id in odd:
        path = f"/v1/collections/kb/documents/{quote(doc_id, safe='/')}"
        got = client.get(path)
        assert got.status_code == 200 and got.json()["id"] == doc_id, (doc_id, got.text)
        assert client.delete(path).status_code == 204
        assert client.get(path).status_code == 404


# ---- 10. OPTIONS and strict types ------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/v1/collections", "GET, OPTIONS, POST"),
        ("/v1/collections/kb", "DELETE, OPTIONS, PATCH"),
        ("/v1/collections/kb/documents", "GET, OPTIONS, POST"),
        ("/v1/collections/kb/documents/x", "DELETE, GET, OPTIONS"),
        ("/v1/collections/kb/search", "OPTIONS, POST"),
        ("/v1/adapters", "GET, OPTIONS, POST"),
    ],
)
def test_options_names_every_method(client, path, methods):
    resp = client.options(path)
    assert resp.status_code == 204
    assert resp.headers["allow"] == methods


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "q", "top_k": "5"}, "top_k"),
        ({"query": "q", "debug": 0}, "debug"),
        ({"query": "q", "min_score": "0.5"}, "min_score"),
        ({"query": 5}, "query"),
    ],
)
def test_body_types_are_strict(client, body, param):
    client.post("/v1/collections/kb/documents", json={"documents": DOCS}).raise_for_status()
    resp = client.post("/v1/collections/kb/search", json=body)
    assert resp.status_code == 400 and error_of(resp)["param"] == param


def test_chat_types_are_strict(client, fake_upstream):
    for body, param in (
        ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "rag": {"top_k": 2.0}}, "rag.top_k"),
    ):
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400 and error_of(resp)["param"] == param, resp.text
    assert fake_upstream.requests == []


def test_top_k_has_one_bound_from_settings(make_client, fake_upstream):
    """Search and chat retrieval refuse top_k past RAG_MAX_TOP_K, the one bound, naming it."""
    client = make_client(max_top_k=7)
    client.post("/v1/collections/kb/documents", json={"documents": DOCS}).raise_for_status()
    ok = client.post("/v1/collections/kb/search", json={"query": "parking", "top_k": 7})
    assert ok.status_code == 200
    resp = client.post("/v1/collections/kb/search", json={"query": "parking", "top_k": 8})
    assert resp.status_code == 400 and error_of(resp)["param"] == "top_k"
    resp = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "rag": {"collection": "kb", "top_k": 8},
        },
    )
    assert resp.status_code == 400 and error_of(resp)["param"] == "rag.top_k"
    assert fake_upstream.requests == []
