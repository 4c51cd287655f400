"""The local backend end to end with the bundled SmolLM2-135M-Instruct on CPU."""

from __future__ import annotations

import asyncio
import json

import pytest

from rag_service.backends.local import BUNDLED_NAME, LocalBackend
from rag_service.settings import Settings
from tests.support import error_of
from tests.test_documents import upsert


@pytest.fixture(scope="session")
def local_backend(tmp_path_factory, bundled_model_dir) -> LocalBackend:
    cache = tmp_path_factory.mktemp("local-model")
    backend = LocalBackend(
        Settings(data_dir=cache, max_new_tokens=48, local_model=str(bundled_model_dir))
    )
    asyncio.run(backend.start())
    return backend


@pytest.fixture
def client(make_client, local_backend):
    client = make_client(backend=local_backend)
    upsert(
        client,
        [
            {"id": "vault", "text": "The vault access code is 7421. Only managers may use it."},
            {"id": "lunch", "text": "Lunch is served in the cafeteria from noon to 2pm."},
        ],
        collection="default",
    )
    return client


def ask(client, question, **extra):
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 48,
        "temperature": 0,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body)


def test_answers_from_ingested_knowledge(client):
    resp = ask(client, "What is the vault access code?")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    answer = body["choices"][0]["message"]["content"]
    assert answer.strip()
    assert "7421" in answer
    assert body["sources"][0]["document_id"] == "vault"
    assert body["model"] == BUNDLED_NAME
    usage = body["usage"]
    assert usage["prompt_tokens"] > 20 and 0 < usage["completion_tokens"] <= 48
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    metrics = client.get("/metrics").text
    assert "rag_generation_batch_size_count 1.0" in metrics  # one batch of one request


def test_stream_token_by_token(client):
    resp = ask(client, "When is lunch served?", stream=True, stream_options={"include_usage": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["sources"][0]["document_id"] == "lunch"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) > 3  # many small deltas, not one blob
    assert "".join(pieces).strip()
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}


def test_stream_equals_non_stream_greedy(client):
    whole = ask(client, "Who may use the vault code?").json()["choices"][0]["message"]
    streamed = ask(client, "Who may use the vault code?", stream=True)
    chunks = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")
    ]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["content"]


def test_length_and_stop(client):
    resp = ask(client, "Describe the cafeteria in detail.", max_tokens=5).json()
    assert resp["choices"][0]["finish_reason"] == "length"
    assert resp["usage"]["completion_tokens"] == 5
    full = ask(client, "What is the vault access code?").json()["choices"][0]["message"]
    word = full["content"].split()[2]
    stopped = ask(client, "What is the vault access code?", stop=[word]).json()
    assert word not in stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_stop_sequences_are_bounded_and_cost_no_vocabulary_table(client):
    """Stop strings are checked on each row's new text: transformers' stop_strings, which
    built (and kept, for the last 8 stop sets) a vocabulary x length table per set, is not
    used, so a long stop costs its length, not gigabytes. Past 4 stops, or a stop longer
    than 256 characters, is a 400 naming ``stop`` before any generation."""
    from transformers.generation import stopping_criteria

    stopping_criteria.STOP_STRING_EMBEDDING_CACHE.clear()
    long_stop = "q" * 256  # the longest allowed
    resp = ask(client, "What is the vault access code?", stop=[long_stop, "7421"], max_tokens=24)
    assert resp.status_code == 200, resp.text
    assert "7421" not in resp.json()["choices"][0]["message"]["content"]
    assert not stopping_criteria.STOP_STRING_EMBEDDING_CACHE  # no table was built
    for stop, limit in (("q" * 257, "256"), (["a", "b", "c", "d", "e"], "4")):
        resp = ask(client, "hi", stop=stop, max_tokens=4)
        assert resp.status_code == 400, resp.text
        error = error_of(resp)
        assert error["param"].startswith("stop") and limit in error["message"], error


def test_local_errors(client):
    resp = ask(client, "hi", max_tokens=10**6)
    assert resp.status_code == 400 and error_of(resp)["param"] == "max_tokens"
    resp = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 400 and error_of(resp)["param"] == "messages[0].role"
    resp = client.post(
        "/v1/chat/completions",
        json={"model": "other", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 404
    assert client.get("/v1/models").json()["data"][0]["id"] == BUNDLED_NAME
