"""Cross-encoder reranking through the real app: a real CrossEncoder directory made from the
bundled MiniLM (a fresh one-output classification head, seeded), the real embedding model and
store. Expected orders come from ``CrossEncoder(dir).predict`` called directly in the test."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from rag_service.cli import main
from rag_service.settings import Settings, SettingsError, bundled_embedding_model
from tests.support import BASE_URL, error_of, free_port, running_server
from tests.test_documents import search, upsert

DOCS = [
    ("paris", "Paris is the capital of France and home to the Eiffel Tower.", "geo"),
    ("rome", "Rome is the capital of Italy, built on seven hills.", "geo"),
    ("nile", "The Nile is the longest river in Africa.", "geo"),
    ("python", "Python is a programming language created by Guido van Rossum.", "tech"),
    ("rust", "Rust is a systems programming language focused on memory safety.", "tech"),
    ("espresso", "Espresso is brewed by forcing hot water through finely ground coffee.", "food"),
    ("zebra", "Zebras have black and white stripes that confuse biting flies.", "nature"),
    ("tea", "Green tea is made from leaves that are not withered or oxidised.", "food"),
    ("lyon", "Lyon is a French city known for its cuisine and silk history.", "geo"),
    ("error", "Error code XJ-4417 means the flux capacitor needs recalibration.", "support"),
]
QUERY = "Which city is the capital of France?"
DEPTH = 8


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cross-encoder directory: MiniLM with a fresh one-output head (seeded), its weights
    scaled so the scores spread over (0, 1) and every order is unambiguous."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    model = CrossEncoder(bundled_embedding_model(), num_labels=1, device="cpu")
    with torch.no_grad():
        model[0].model.classifier.weight.mul_(50)
    path = tmp_path_factory.mktemp("reranker") / "minilm-ce"
    model.save(str(path))
    return path


@pytest.fixture(scope="session")
def reference(cross_encoder_dir: Path):
    """The same model, loaded the plain way, for the expected scores."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(cross_encoder_dir), device="cpu")


def expected(reference, query: str, candidates: list[dict]) -> list[tuple[int, float]]:
    """(chunk_id, score) of the candidates in the order the model ranks them."""
    scores = reference.predict([(query, c["text"]) for c in candidates], show_progress_bar=False)
    ranked = sorted(zip(candidates, scores, strict=True), key=lambda cs: -float(cs[1]))
    return [(c["chunk_id"], float(s)) for c, s in ranked]


def assert_follows(results: list[dict], want: list[tuple[int, float]]) -> None:
    assert [r["chunk_id"] for r in results] == [chunk for chunk, _ in want]
    for r, (_, score) in zip(results, want, strict=True):
        assert r["score"] == pytest.approx(score, abs=1e-4)


def _docs() -> list[dict]:
    return [{"id": i, "text": t, "metadata": {"topic": topic}} for i, t, topic in DOCS]


@pytest.fixture
def rk(make_client, cross_encoder_dir):
    client = make_client(reranker_model=str(cross_encoder_dir), rerank_depth=DEPTH)
    upsert(client, _docs())
    return client


def test_rerank_order_follows_the_model(rk, reference):
    candidates = search(rk, QUERY, top_k=DEPTH, rerank=False)
    assert len(candidates) == DEPTH
    want = expected(reference, QUERY, candidates)
    # The model's order is not the retrieval order, so following it is a real check.
    assert [c for c, _ in want] != [c["chunk_id"] for c in candidates]

    resp = rk.post(
        "/v1/collections/kb/search",
        json={"query": QUERY, "top_k": DEPTH, "rerank": True, "rerank_depth": DEPTH, "debug": True},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert_follows(body["results"], want)
    assert body["timings_ms"]["rerank"] > 0
    retrieval = {c["chunk_id"]: c["score"] for c in candidates}
    for r in body["results"]:
        parts = r["scores"]
        assert set(parts) == {"dense", "retrieval", "rerank"}
        assert parts["rerank"] == r["score"]
        assert parts["retrieval"] == pytest.approx(retrieval[r["chunk_id"]], abs=1e-5)

    # top_k < depth: the best top_k of the same candidates; the default depth is the setting.
    assert_follows(search(rk, QUERY, top_k=3, rerank=True), want[:3])
    # min_score applies to the reranker's score.
    cut = (want[1][1] + want[2][1]) / 2
    assert_follows(search(rk, QUERY, top_k=DEPTH, rerank=True, min_score=cut), want[:2])
    # A deeper rerank scores more candidates: its best are drawn from a larger set.
    deep = search(rk, QUERY, top_k=len(DOCS), rerank=False)
    assert_follows(
        search(rk, QUERY, top_k=3, rerank=True, rerank_depth=len(DOCS)),
        expected(reference, QUERY, deep)[:3],
    )


def test_rerank_after_hybrid_and_filter(rk, reference):
    query = "XJ-4417 error or the French capital"
    flt = {"topic": {"$in": ["geo", "support"]}}
    candidates = search(rk, query, top_k=4, mode="hybrid", filter=flt)
    assert {c["metadata"]["topic"] for c in candidates} <= {"geo", "support"}
    results = search(
        rk, query, top_k=4, mode="hybrid", filter=flt, rerank=True, rerank_depth=4, debug=True
    )
    assert_follows(results, expected(reference, query, candidates))
    assert all(r["metadata"]["topic"] in {"geo", "support"} for r in results)
    assert {"dense", "bm25", "fused", "retrieval", "rerank"} <= set(results[0]["scores"])


def test_collection_may_default_to_reranking(rk, reference):
    resp = rk.patch("/v1/collections/kb", json={"search": {"rerank": True, "rerank_depth": 5}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["search"] == {"rerank": True, "rerank_depth": 5}
    candidates = search(rk, QUERY, top_k=5, rerank=False)
    assert "rerank" not in search(rk, QUERY, rerank=False, debug=True)[0]["scores"]
    assert_follows(search(rk, QUERY, top_k=2), expected(reference, QUERY, candidates)[:2])
    bad = rk.patch("/v1/collections/kb", json={"search": {"rerank_depth": 201}})
    assert error_of(bad)["param"] == "search.rerank_depth"


def test_chat_rag_rerank(rk, reference, fake_upstream):
    question = "What is the capital of France?"
    candidates = search(rk, question, top_k=DEPTH, rerank=False)
    want = expected(reference, question, candidates)[:2]
    resp = rk.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": question}],
            "rag": {"collection": "kb", "top_k": 2, "rerank": True},
        },
    )
    assert resp.status_code == 200, resp.text
    sources = resp.json()["sources"]
    assert [s["chunk_id"] for s in sources] == [c for c, _ in want]
    assert [s["score"] for s in sources] == pytest.approx([s for _, s in want], abs=1e-4)
    prompt = fake_upstream.requests[-1]["messages"][0]["content"]
    assert prompt.index(sources[0]["text"]) < prompt.index(sources[1]["text"])
    bad = rk.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": question}],
            "rag": {"collection": "kb", "rerank": True, "rerank_depth": 500},
        },
    )
    assert bad.status_code == 400 and error_of(bad)["param"] == "rag.rerank_depth"


def test_evaluate_reports_rerank_when_configured(rk):
    assert rk.get("/ready").json()["reranker_model"] == "minilm-ce"
    rows = [{"question": QUERY, "document_id": "paris"}, {"question": "river", "answer": "Nile"}]
    resp = rk.post("/v1/collections/kb/evaluate", json={"rows": rows})
    assert resp.status_code == 200, resp.text
    modes = resp.json()["modes"]
    assert list(modes) == ["dense", "hybrid", "rerank"]
    assert 0.0 <= modes["rerank"]["recall@10"] <= 1.0 and modes["rerank"]["latency_p50_ms"] > 0
    only = rk.post("/v1/collections/kb/evaluate", json={"rows": rows, "modes": ["rerank"]})
    assert list(only.json()["modes"]) == ["rerank"]
    assert only.json()["modes"]["rerank"] == modes["rerank"] | {
        "latency_p50_ms": only.json()["modes"]["rerank"]["latency_p50_ms"]
    }


def test_scores_are_sigmoids_whatever_activation_the_model_saved(tmp_path, cross_encoder_dir):
    """sentence-transformers applies the activation saved with a model: one saved with
    Identity returns raw logits there, while the service still scores in (0, 1)."""
    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder

    from rag_service.reranking import Reranker

    raw_dir = tmp_path / "identity-ce"
    CrossEncoder(str(cross_encoder_dir), device="cpu", activation_fn=torch.nn.Identity()).save(
        str(raw_dir)
    )
    pairs = [(QUERY, text) for _, text, _ in DOCS]
    logits = CrossEncoder(str(raw_dir), device="cpu").predict(pairs, show_progress_bar=False)
    assert logits.min() < 0 or logits.max() > 1  # the saved Identity: raw logits
    scores = Reranker(str(raw_dir), device="cpu").predict(pairs)
    assert np.all((scores > 0) & (scores < 1))
    assert scores == pytest.approx(1 / (1 + np.exp(-logits)), abs=1e-5)


def test_evaluate_rerank_depth_reranks_the_head_of_a_ranking_ten_deep(rk, reference):
    """recall@10 looks ten documents deep whatever rerank_depth is: the first rerank_depth
    candidates are reranked, the retrieval ranking follows them."""
    questions = ["Which city is the capital of France?", "hot drinks", "a French city"]
    rows = [{"question": q, "document_id": "lyon"} for q in questions]
    dense = search(rk, questions[0], top_k=10, rerank=False)
    assert [r["document_id"] for r in dense].index("lyon") >= 1  # not first, within ten

    def figures(**extra):
        resp = rk.post("/v1/collections/kb/evaluate", json={"rows": rows, **extra})
        assert resp.status_code == 200, resp.text
        return {
            m: {k: v for k, v in f.items() if k != "latency_p50_ms"}
            for m, f in resp.json()["modes"].items()
        }

    base = figures(modes=["dense"])["dense"]
    assert base["recall@10"] > base["recall@1"]
    # Reranking one candidate changes nothing: the rerank figures are the dense ones.
    assert figures(modes=["rerank"], rerank_depth=1)["rerank"] == base
    # Reranking three reorders only the first three: the same ten documents.
    assert figures(modes=["rerank"], rerank_depth=3)["rerank"]["recall@10"] == base["recall@10"]


def test_bad_input_without_a_reranker(client):
    upsert(client, _docs()[:3])
    resp = client.post("/v1/collections/kb/search", json={"query": QUERY, "rerank": True})
    error = error_of(resp)
    assert resp.status_code == 400 and error["param"] == "rerank"
    assert "RAG_RERANKER_MODEL" in error["message"]
    # rerank: false, or a depth alone, is a plain search.
    assert search(client, QUERY, rerank=False, rerank_depth=3)
    resp = client.patch("/v1/collections/kb", json={"search": {"rerank": True}})
    assert resp.status_code == 400 and error_of(resp)["param"] == "search.rerank"
    resp = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "rag": {"collection": "kb", "rerank": True},
        },
    )
    assert resp.status_code == 400 and error_of(resp)["param"] == "rag.rerank"
    resp = client.post(
        "/v1/collections/kb/evaluate",
        json={"rows": [{"question": QUERY, "document_id": "paris"}], "modes": ["rerank"]},
    )
    assert resp.status_code == 400 and error_of(resp)["param"] == "modes"
    assert (
        "rerank"
        not in client.post(
            "/v1/collections/kb/evaluate",
            json={"rows": [{"question": QUERY, "document_id": "paris"}]},
        ).json()["modes"]
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rerank": True, "rerank_depth": 201}, "rerank_depth"),
        ({"rerank": True, "rerank_depth": 0}, "rerank_depth"),
        ({"rerank": "yes"}, "rerank"),
    ],
)
def test_bad_rerank_fields(rk, body, param):
    resp = rk.post("/v1/collections/kb/search", json={"query": QUERY, **body})
    assert resp.status_code == 400 and error_of(resp)["param"] == param, resp.text


def test_bad_reranker_directories_are_refused_at_start(tmp_path, cross_encoder_dir, capsys):
    two = tmp_path / "two-labels"
    shutil.copytree(cross_encoder_dir, two)
    config = json.loads((two / "config.json").read_text())
    config["id2label"] = {"0": "no", "1": "yes"}
    (two / "config.json").write_text(json.dumps(config))
    cases = {
        str(tmp_path / "nowhere"): "is not a directory",
        bundled_embedding_model(): "bi-encoder",
        str(two): "2 outputs",
        str(tmp_path): "no config.json",
    }
    for path, why in cases.items():
        with pytest.raises(SettingsError, match=f"^RAG_RERANKER_MODEL: .*{why}"):
            Settings(reranker_model=path)
    assert main(["serve", "--reranker-model", str(tmp_path / "nowhere")]) == 2
    assert "RAG_RERANKER_MODEL" in capsys.readouterr().err


def test_directory_gone_before_start_is_a_startup_error(tmp_path, cross_encoder_dir):
    from litestar.testing import TestClient

    from rag_service.app import create_app

    copy = tmp_path / "ce"
    shutil.copytree(cross_encoder_dir, copy)
    settings = Settings(
        data_dir=tmp_path / "data",
        reranker_model=str(copy),
        upstream_url="http://127.0.0.1:9/v1",
    )
    shutil.rmtree(copy)
    with TestClient(create_app(settings), base_url=BASE_URL) as client:
        for _ in range(600):
            resp = client.get("/ready")
            if "startup failed" in resp.text:
                break
            threading.Event().wait(0.05)
        assert resp.status_code == 503 and "RAG_RERANKER_MODEL" in resp.text, resp.text


def _batches(url: str) -> tuple[float, float]:
    """(batches, pairs) the reranker has scored, from /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("rag_rerank_batch_size_count", "rag_rerank_batch_size_sum"):
            values[name] = float(value)
    return values["rag_rerank_batch_size_count"], values["rag_rerank_batch_size_sum"]


def test_concurrent_reranks_share_batches_and_the_query_thread(
    tmp_path, embedder, cross_encoder_dir, reference
):
    settings = Settings(
        data_dir=tmp_path / "data",
        port=free_port(),
        upstream_url="http://127.0.0.1:9/v1",
        reranker_model=str(cross_encoder_dir),
        rerank_depth=5,
    )
    queries = [
        "Which city is the capital of France?",
        "Which river is the longest in Africa?",
        "Who created the Python language?",
        "How is espresso brewed?",
        "Why do zebras have stripes?",
        "What does error XJ-4417 mean?",
        "Which language focuses on memory safety?",
        "How is green tea made?",
    ]
    with running_server(settings, embedder) as url:
        httpx.post(f"{url}/v1/collections/kb/documents", json={"documents": _docs()}, timeout=60)
        alone = {q: search_url(url, q, rerank=True) for q in queries}
        before = _batches(url)

        async def burst() -> list[list[dict]]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                responses = await asyncio.gather(
                    *[
                        http.post("/v1/collections/kb/search", json={"query": q, "rerank": True})
                        for q in queries
                    ]
                )
            return [r.json()["results"] for r in responses]

        together = asyncio.run(burst())
        batches, pairs = (a - b for a, b in zip(_batches(url), before, strict=True))
        assert pairs == 5 * len(queries)
        assert batches < len(queries), batches
        # The reranker adds no thread: its batches ran on the embedding batcher's query thread.
        names = [t.name for t in threading.enumerate()]
        assert sum(n.startswith("embed-interactive") for n in names) == 1, names
        for q, results in zip(queries, together, strict=True):
            assert [r["chunk_id"] for r in results] == [r["chunk_id"] for r in alone[q]]
            assert [r["score"] for r in results] == pytest.approx(
                [r["score"] for r in alone[q]], abs=1e-4
            )
        # The CLI reports the rerank mode too.
        qa = tmp_path / "qa.jsonl"
        qa.write_text(json.dumps({"question": queries[0], "document_id": "paris"}) + "\n")
        assert main(["eval", str(qa), "--url", url, "-c", "kb", "--modes", "rerank"]) == 0


def search_url(url: str, query: str, **kw) -> list[dict]:
    resp = httpx.post(f"{url}/v1/collections/kb/search", json={"query": query, **kw}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]
