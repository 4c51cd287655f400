"""Citation verification (rag.citations: verify): splitting, markers, scoring with the real
bundled MiniLM, the rewrite, and the chat route end to end with the fake upstream (JSON and
SSE) and the bundled local model."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from rag_service.backends.local import LocalBackend
from rag_service.citations import (
    CitationPolicy,
    Verification,
    find_markers,
    judge,
    split_sentences,
    verify,
)
from rag_service.settings import Settings
from tests.fake_upstream import MODEL
from tests.support import error_of
from tests.test_documents import upsert

FACTS = [
    {"id": "france", "text": "Paris is the capital of France."},
    {"id": "italy", "text": "Rome is the capital of Italy."},
    {"id": "zebra", "text": "Zebras have black and white stripes."},
]


# ---- splitting and markers ---------------------------------------------------------------
def test_sentences_and_markers_keep_exact_offsets():
    answer = (
        "Use a tool, e.g. mandb, to rebuild it [1]. Version 3.5 added this [2][3]. "
        "See Dr. Smith's notes. [1, 3]\n"
        "1. Run `a[1]` first.\n"
        "It works! [4](http://x) Done.[2]"
    )
    sentences = split_sentences(answer)
    assert [(s.start, s.end, s.text) for s in sentences] == [
        (0, 42, "Use a tool, e.g. mandb, to rebuild it [1]."),  # no split after "e.g."
        (43, 73, "Version 3.5 added this [2][3]."),  # nor inside 3.5
        (74, 103, "See Dr. Smith's notes. [1, 3]"),  # markers after the period belong here
        (104, 124, "1. Run `a[1]` first."),  # a list number ends nothing; code is no marker
        (125, 134, "It works!"),
        (135, 157, "[4](http://x) Done.[2]"),  # a link is no citation
    ]
    for s in sentences:
        assert answer[s.start : s.end] == s.text
    markers = find_markers(answer)
    assert [(m.start, m.end, m.indices) for m in markers] == [
        (38, 41, (1,)),
        (66, 69, (2,)),
        (69, 72, (3,)),
        (97, 103, (1, 3)),
        (154, 157, (2,)),
    ]
    assert [answer[m.start : m.end] for m in markers] == ["[1]", "[2]", "[3]", "[1, 3]", "[2]"]
    assert sentences[1].cited == [2, 3] and sentences[2].cited == [1, 3]
    assert sentences[0].claim == "Use a tool, e.g. mandb, to rebuild it."
    assert sentences[3].markers == ()  # `a[1]` is code


def test_code_fences_hold_no_sentences_and_indexing_is_no_marker():
    answer = "Run this [1]:\n```\nx = items[2]. y = [3]\n```\nThen x[1][2] is set [2]."
    assert [m.indices for m in find_markers(answer)] == [(1,), (2,)]
    assert [s.text for s in split_sentences(answer)] == [
        "Run this [1]:",
        "Then x[1][2] is set [2].",
    ]


# ---- scoring with the bundled model ------------------------------------------------------
def test_scores_with_the_bundled_model(embedder):
    sources = [
        "The vault access code is 7421. Only managers may use it. The vault is in the "
        "basement, next to the archive room.",
        "Lunch is served in the cafeteria from noon to 2pm. Vegetarian dishes are available.",
    ]

    async def embed(texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(embedder.encode, texts)

    answer = (
        "Only managers may use it [1]. "  # copied from source 1
        "Lunch is served in the cafeteria from noon [1]. "  # true, but not what 1 says
        "Vegetarian dishes are available in the cafeteria."  # uncited, source 2 says it
    )
    result = asyncio.run(verify(answer, sources, embed, CitationPolicy()))
    verdicts = [(d.sentence, d.index, d.status) for d in result.decisions]
    assert verdicts == [
        (0, 1, "supported"),
        (1, 1, "unsupported"),
        (1, 2, "added"),
        (2, 2, "added"),
    ]
    scores = {(d.sentence, d.index): d.score for d in result.decisions}
    assert scores[(0, 1)] > 0.9 and scores[(1, 1)] < CitationPolicy().threshold
    assert result.cited() == {1: True, 2: True}


# ---- verdicts and the rewrite (fixed scores) -----------------------------------------------
def test_rewrite_drops_unsupported_and_adds_clear_sources():
    answer = (
        "Paris is the capital of France [2]. Rome is the capital of Italy [1, 2]. "
        "Zebras have stripes. Yes. It is warm [9]."
    )
    sentences = split_sentences(answer)
    scores = np.array(
        [
            [0.95, 0.40, 0.10],  # cites 2 (wrong): dropped, 1 added
            [0.20, 0.90, 0.10],  # cites 1 and 2: 1 dropped, 2 kept
            [0.70, 0.10, 0.75],  # uncited, no clear winner: nothing added
            [0.90, 0.10, 0.10],  # "Yes." is too short to be given a source
            [0.10, 0.10, 0.10],  # cites 9, which does not exist
        ],
        np.float32,
    )
    decisions = judge(sentences, scores, 3, CitationPolicy(threshold=0.65, margin=0.1))
    assert [(d.sentence, d.index, d.status, d.score) for d in decisions] == [
        (0, 2, "unsupported", 0.4),
        (0, 1, "added", 0.95),
        (1, 1, "unsupported", 0.2),
        (1, 2, "supported", 0.9),
        (4, 9, "unsupported", None),
    ]
    result = Verification(answer, sentences, decisions, 3)
    text, citations = result.rewritten()
    assert text == (
        "Paris is the capital of France [1]. Rome is the capital of Italy [2]. "
        "Zebras have stripes. Yes. It is warm."
    )
    assert [(c.index, c.sentence, c.status) for c in citations] == [
        (2, "Paris is the capital of France [1].", "unsupported"),
        (1, "Paris is the capital of France [1].", "added"),
        (1, "Rome is the capital of Italy [2].", "unsupported"),
        (2, "Rome is the capital of Italy [2].", "supported"),
        (9, "It is warm.", "unsupported"),
    ]
    assert all(text[c.start : c.end] == c.sentence for c in citations)
    # As streamed (not rewritten): offsets into the original text.
    for c in result.as_written():
        assert answer[c.start : c.end] == c.sentence
    assert result.cited() == {1: True, 2: True, 3: False}


def test_markers_after_the_period_and_empty_markers_leave_clean_text():
    answer = "Paris is the capital of France. [3] Rome is in Italy.[3] Done.\n[2] Zebras run."
    sentences = split_sentences(answer)
    scores = np.array(
        [[0.9, 0.1, 0.2], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [0.1, 0.1, 0.1]], np.float32
    )
    result = Verification(answer, sentences, judge(sentences, scores, 3, CitationPolicy()), 3)
    text, citations = result.rewritten()
    assert text == "Paris is the capital of France [1]. Rome is in Italy. Done.\nZebras run."
    assert all(text[c.start : c.end] == c.sentence for c in citations)


# ---- through the chat route --------------------------------------------------------------
def _probe_order(client) -> dict[str, int]:
    """Source index of each fact for the question below (citations: model, today's shape)."""
    resp = client.post("/v1/chat/completions", json=_ask())
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "citations" not in body and all("cited" not in s for s in body["sources"])
    return {s["document_id"]: s["index"] for s in body["sources"]}


def _ask(**extra) -> dict:
    rag = {"top_k": 3, **extra.pop("rag", {})}
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What are the capitals of France and Italy?"}],
        "rag": rag,
        **extra,
    }


@pytest.fixture
def facts_client(make_client):
    client = make_client()
    upsert(client, FACTS, collection="default")
    return client


def test_verified_answer_is_rewritten(facts_client, fake_upstream):
    order = _probe_order(facts_client)
    f, i, z = order["france"], order["italy"], order["zebra"]
    fake_upstream.reply = (
        f"Paris is the capital of France [{i}]. Rome is the capital of Italy [{i}]."
    )
    resp = facts_client.post("/v1/chat/completions", json=_ask(rag={"citations": "verify"}))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    content = body["choices"][0]["message"]["content"]
    assert content == f"Paris is the capital of France [{f}]. Rome is the capital of Italy [{i}]."
    got = [(c["index"], c["status"], c["sentence"]) for c in body["citations"]]
    assert got == [
        (i, "unsupported", f"Paris is the capital of France [{f}]."),
        (f, "added", f"Paris is the capital of France [{f}]."),
        (i, "supported", f"Rome is the capital of Italy [{i}]."),
    ]
    for c in body["citations"]:
        assert content[c["start"] : c["end"]] == c["sentence"]
        assert 0 <= c["score"] <= 1
    cited = {s["index"]: s["cited"] for s in body["sources"]}
    assert cited == {f: True, i: True, z: False}


def test_verified_stream_carries_verdicts_on_its_last_chunk(facts_client, fake_upstream):
    order = _probe_order(facts_client)
    f, i, z = order["france"], order["italy"], order["zebra"]
    fake_upstream.reply = (
        f"Paris is the capital of France [{i}]. Zebras have black and white stripes."
    )
    resp = facts_client.post(
        "/v1/chat/completions",
        json=_ask(rag={"citations": "verify"}, stream=True, stream_options={"include_usage": True}),
    )
    assert resp.status_code == 200, resp.text
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {s["document_id"] for s in chunks[0]["sources"]} == {"france", "italy", "zebra"}
    assert "text" in chunks[0]["sources"][0] and "citations" not in chunks[0]
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 18  # usage comes last
    assert all("citations" not in c for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.split() == fake_upstream.reply.split()  # the tokens went out unchanged
    got = [(c["index"], c["status"]) for c in last["citations"]]
    assert got == [(i, "unsupported"), (f, "added"), (z, "added")]
    for c in last["citations"]:
        assert text[c["start"] : c["end"]] == c["sentence"]
    assert sorted((s["index"], s["cited"]) for s in last["sources"]) == sorted(
        [(f, True), (i, False), (z, True)]
    )


def test_service_default_and_a_failed_check(make_client, fake_upstream):
    # RAG_CITATIONS=verify; an embedding limit the check cannot meet makes it fail, and the
    # answer still comes back, unchanged, with the reason instead of verdicts.
    client = make_client(citations="verify", max_embedding_tokens=2)
    upsert(client, FACTS, collection="default")
    fake_upstream.reply = "Zebras have black and white stripes [2]."
    resp = client.post("/v1/chat/completions", json=_ask())
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == fake_upstream.reply
    assert "citations" not in body and "could not be checked" in body["citations_error"]
    stream = client.post("/v1/chat/completions", json=_ask(stream=True))
    chunks = [json.loads(x[6:]) for x in stream.text.splitlines() if x.startswith("data: {")]
    assert "could not be checked" in chunks[-1]["citations_error"]
    # A request may turn it off again: today's shape.
    plain = client.post("/v1/chat/completions", json=_ask(rag={"citations": "model"})).json()
    assert "citations" not in plain and "citations_error" not in plain


def test_bad_citations_mode_is_refused(facts_client, fake_upstream):
    resp = facts_client.post("/v1/chat/completions", json=_ask(rag={"citations": "bogus"}))
    assert resp.status_code == 400
    assert error_of(resp)["param"] == "rag.citations"
    assert fake_upstream.requests == []


# ---- the local backend -------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_backend(tmp_path_factory, bundled_model_dir) -> LocalBackend:
    backend = LocalBackend(
        Settings(
            data_dir=tmp_path_factory.mktemp("local-cite"),
            max_new_tokens=32,
            local_model=str(bundled_model_dir),
        )
    )
    asyncio.run(backend.start())
    return backend


def test_local_backend_answer_is_verified(make_client, local_backend):
    client = make_client(backend=local_backend)
    upsert(
        client,
        [{"id": "vault", "text": "The vault access code is 7421. Only managers may use it."}],
        collection="default",
    )
    resp = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "What is the vault access code?"}],
            "max_tokens": 32,
            "temperature": 0,
            "rag": {"citations": "verify"},
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    content = body["choices"][0]["message"]["content"]
    assert "7421" in content
    assert body["sources"][0]["document_id"] == "vault"
    assert isinstance(body["sources"][0]["cited"], bool)
    # The sentence naming the code is backed by the only source: cited (kept or added).
    assert any(c["index"] == 1 and c["status"] != "unsupported" for c in body["citations"])
    for c in body["citations"]:
        assert content[c["start"] : c["end"]] == c["sentence"]
