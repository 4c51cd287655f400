from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest

from rag_service.embedding import Embedder
from rag_service.settings import Settings
from tests.support import error_of, free_port, running_server


@pytest.fixture(scope="module", params=["auto", "torch"])
def embedder(request: pytest.FixtureRequest, embedder: Embedder) -> Embedder:
    """Every test here runs on two set-ups: the session's embedder (the default, auto: each
    lane on the runtime measured fastest here) and the same model on PyTorch fp32."""
    if request.param == "auto":
        assert set(embedder.runtimes.values()) <= {"onnx", "torch", "torch-bf16"}
        return embedder
    torch_embedder = Embedder(Settings().embedding_model_path, device="cpu", runtime="torch")
    assert torch_embedder.runtime == "torch"
    return torch_embedder


def test_openai_shape(client, embedder):
    resp = client.post(
        "/v1/embeddings",
        json={"input": ["hello world", "second text"], "model": "all-MiniLM-L6-v2"},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list"
    assert body["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["object"] == "embedding"
    vec = np.array(body["data"][0]["embedding"], dtype=np.float32)
    assert vec.shape == (384,)
    np.testing.assert_allclose(vec, embedder.encode(["hello world"])[0], atol=1e-5)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == 2 + 2 + 4


def test_string_input_and_base64(client):
    plain = client.post("/v1/embeddings", json={"input": "single"}).json()
    assert len(plain["data"]) == 1
    packed = client.post(
        "/v1/embeddings", json={"input": "single", "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, plain["data"][0]["embedding"], atol=1e-6)


def test_errors(client):
    cases = [
        ({"input": ""}, 400, "input"),
        ({"input": ["ok", " "]}, 400, "input[1]"),
        ({"input": []}, 400, "input"),
        ({"input": [1, 2]}, 400, "input"),  # token ids: refused with the way out
        ({"input": "x", "model": "text-embedding-3-small"}, 404, "model"),
        ({"input": "x", "dimensions": 1536}, 400, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x" * 9000}, 400, "input"),
    ]
    for body, status, param in cases:
        resp = client.post("/v1/embeddings", json=body)
        assert resp.status_code == status, (body, resp.text)
        assert error_of(resp)["param"] == param, (body, resp.text)


async def _burst(url: str, n: int) -> tuple[list[httpx.Response], str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        responses = await asyncio.gather(
            *[
                client.post("/v1/embeddings", json={"input": f"concurrent text {i}"})
                for i in range(n)
            ]
        )
        metrics = (await client.get("/metrics")).text
    return list(responses), metrics


def test_concurrent_requests_are_batched(tmp_path, embedder, fake_server):
    settings = Settings(data_dir=tmp_path, port=free_port(), upstream_url=fake_server.url)
    with running_server(settings, embedder) as url:
        responses, metrics = asyncio.run(_burst(url, 48))
    assert all(r.status_code == 200 for r in responses)
    for i, r in enumerate(responses[:5]):
        np.testing.assert_allclose(
            r.json()["data"][0]["embedding"],
            embedder.encode([f"concurrent text {i}"])[0],
            atol=1e-5,
        )
    count = _metric(metrics, "rag_embedding_batch_size_count")
    total = _metric(metrics, "rag_embedding_batch_size_sum")
    assert total == 48
    assert count < 48 / 2, f"48 requests ran in {count} batches: not merged"


def test_overload_answers_503_with_retry_after(tmp_path, embedder, fake_server):
    settings = Settings(
        data_dir=tmp_path,
        max_batch_size=1,
        queue_size=1,
        port=free_port(),
        upstream_url=fake_server.url,
    )
    with running_server(settings, embedder) as url:
        responses, _ = asyncio.run(_burst(url, 24))
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 503 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert error_of(rejected)["type"] == "overloaded_error"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


TOKENIZER_TEXTS = [
    "How do I reset my password?",
    "",
    "   padded on both sides   ",
    "Straße, œuvre, São Paulo, Zürich; 北京市; Ελληνικά; عربى",
    "code: `def f(x): return x ** 2`  # comment\twith tab",
    "word " * 400,  # past the 256-token window: truncated
]


def test_batch_tokenizer_reproduces_the_library_features(embedder):
    import torch

    assert embedder._batch_tokenizer is not None  # the bundled model takes the fast path
    for batch in (TOKENIZER_TEXTS, TOKENIZER_TEXTS[:1], TOKENIZER_TEXTS[2:4]):
        ours = embedder.tokenize_batch(batch)
        theirs = embedder._preprocess(batch)
        assert set(ours) == set(theirs)
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(ours[key], value), key
            else:
                assert ours[key] == value
    assert embedder.tokenize_batch(TOKENIZER_TEXTS)["input_ids"].shape[1] == 256


def test_library_preprocessing_is_kept_when_the_batch_tokenizer_differs(monkeypatch, embedder):
    runtime = embedder.runtimes["interactive"]
    reference = Embedder(Settings().embedding_model_path, device="cpu", runtime=runtime)
    tokens = reference.count_tokens(TOKENIZER_TEXTS)
    expected = reference.encode(TOKENIZER_TEXTS, tokens)
    real = Embedder._pad

    def off_by_one(self, rows):
        features = real(self, rows)
        features["input_ids"] = features["input_ids"] + 1
        return features

    monkeypatch.setattr(Embedder, "_pad", off_by_one)
    fallback = Embedder(Settings().embedding_model_path, device="cpu", runtime=runtime)
    assert fallback._batch_tokenizer is None and fallback.runtime == runtime
    assert np.allclose(fallback.encode(TOKENIZER_TEXTS, tokens), expected, atol=1e-6)


def test_token_id_arrays_are_refused_with_the_way_out(client):
    """LangChain's OpenAIEmbeddings sends tiktoken ids by default; they cannot be decoded for
    this model, so the answer says what to send instead."""
    for given in ([[9906, 1917]], [9906, 1917], ["hello", [9906]]):
        resp = client.post("/v1/embeddings", json={"input": given})
        assert resp.status_code == 400, resp.text
        err = error_of(resp)
        assert err["param"] == "input"
        assert "check_embedding_ctx_length=False" in err["message"]
    assert client.post("/v1/embeddings", json={"input": ["hello"]}).status_code == 200
