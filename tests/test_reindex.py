"""Moving a collection to another embedding model: POST /v1/collections/{name}/reindex.

The second model is the bundled MiniLM followed by a seeded Dense projection to 128
dimensions: the dimension changes and so does every score, so the scores of an answer tell
which model made it (each one is checked against both models' vectors, computed here).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rag_service.cli import main
from rag_service.embedding import Embedder
from rag_service.settings import Settings, bundled_embedding_model
from tests.conftest import (
    ENGINES,
    engine_database_url,
    error_of,
    free_port,
    running_server,
    start_subprocess_server,
    wait_http_ready,
)
from tests.test_documents import search, upsert

OLD = "sentence-transformers/all-MiniLM-L6-v2"
NEW = "proj128"
TOPICS = [
    "cats purring and chasing mice",
    "freight trains crossing the plains",
    "violins and cellos in an orchestra",
    "glaciers melting in the Alps",
]
FLAG = (
    "This embed model is WORSE than its base on the held-out validation split (12 "
    "questions). Do not serve it.\n\nrecall@1 0.500 -> 0.417\n"
)


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Tests of engine behaviour run on both storage engines."""
    return engine_database_url(request)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RAG_MODELS_DIR: ``proj128`` (384 -> 128), ``flagged`` (the same, flagged worse than
    base by the trainer), ``notes`` (no model) and ``cross`` (a CrossEncoder's markers)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    root = tmp_path_factory.mktemp("models")
    model = SentenceTransformer(bundled_embedding_model(), device="cpu")
    weight = torch.randn(128, 384, generator=torch.Generator().manual_seed(7)) / 128**0.5
    model.append(Dense(384, 128, bias=False, activation_function=None, init_weight=weight))
    model.append(Normalize())
    model.save(str(root / NEW))
    shutil.copytree(root / NEW, root / "flagged", copy_function=_link)
    (root / "flagged" / "WORSE_THAN_BASE").write_text(FLAG)
    (root / "notes").mkdir()
    (root / "notes" / "README.md").write_text("not a model")
    (root / "cross").mkdir()
    (root / "cross" / "modules.json").write_text("[]")
    (root / "cross" / "config_sentence_transformers.json").write_text(
        '{"model_type": "CrossEncoder"}'
    )
    return root


@pytest.fixture(scope="session")
def new_embedder(models_dir: Path) -> Embedder:
    return Embedder(str(models_dir / NEW), device="cpu")


def notes(n: int) -> list[dict[str, Any]]:
    return [{"id": f"d{i}", "text": f"Note {i}: {TOPICS[i % 4]}."} for i in range(n)]


def collection(client: Any, name: str = "kb") -> dict[str, Any]:
    return next(c for c in client.get("/v1/collections").json()["data"] if c["name"] == name)


def wait_reindexed(client: Any, name: str = "kb", timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/collections/{name}/reindex").json()
        if job["state"] != "running":
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_reindex_moves_the_collection_to_the_new_model(
    make_client, models_dir, new_embedder, tmp_path
):
    data = tmp_path / "data"
    client = make_client(data_dir=data, models_dir=models_dir)
    assert client.post("/v1/collections", json={"name": "kb", "index": "HNSW16"}).status_code == 201
    faq = {
        "id": "faq",
        "text": "Open the settings page and choose reset.",
        "questions": ["How do I recover a lost password?"],
    }
    upsert(client, [*notes(24), faq])
    before = collection(client)
    assert before["reindex"] is None

    resp = client.post("/v1/collections/kb/reindex", json={"embedding_model": NEW})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert (body["embedding_model"], body["dimension"]) == (OLD, 384)  # until the swap
    job = body["reindex"]
    assert (job["embedding_model"], job["dimension"], job["from_model"]) == (NEW, 128, OLD)
    assert job["state"] == "running" and job["total"] == before["chunks"] + 1  # + the question

    done = wait_reindexed(client)
    assert done["state"] == "done" and done["done"] == done["total"] == 26 and "error" not in done
    after = collection(client)
    assert (after["embedding_model"], after["dimension"]) == (NEW, 128)
    assert after["reindex"] == done
    hits = search(client, "string instruments", top_k=3)
    assert "violins" in hits[0]["text"]
    query = new_embedder.encode(["string instruments"])[0]
    for hit in hits:  # the scores are the new model's
        expected = float(new_embedder.encode([hit["text"]])[0] @ query)
        assert hit["score"] == pytest.approx(expected, abs=2e-3)
    assert search(client, "I lost my password", top_k=1)[0]["document_id"] == "faq"
    upsert(client, [{"id": "late", "text": "Penguins huddle together on the Antarctic ice."}])
    assert search(client, "birds of the frozen south", top_k=1)[0]["document_id"] == "late"

    emb = client.post("/v1/embeddings", json={"input": "hello", "model": NEW}).json()
    assert emb["model"] == NEW and len(emb["data"][0]["embedding"]) == 128
    err = error_of(
        client.post("/v1/embeddings", json={"input": "hi", "model": NEW, "dimensions": 384})
    )
    assert err["param"] == "dimensions" and "128" in err["message"]

    client.__exit__(None, None, None)  # a restart loads the collection's model with it
    again = make_client(data_dir=data, models_dir=models_dir)
    assert again.get("/ready").json()["embedding_models"] == [OLD, NEW]
    assert "violins" in search(again, "string instruments", top_k=1)[0]["text"]


def test_searches_and_writes_during_a_reindex_see_one_model(
    models_dir, embedder, new_embedder, tmp_path, database_url
):
    """Searches running through the reindex and its swap never fail, and every answer was
    made by one model (its scores match the old model's vectors, or the new one's); writes
    made meanwhile are all acknowledged and carry new-model vectors after the swap."""
    settings = Settings(
        data_dir=tmp_path / "data",
        port=free_port(),
        upstream_url="http://127.0.0.1:9/v1",
        upstream_model="none",
        database_url=database_url,
        models_dir=models_dir,
        reindex_batch_size=4,
        reindex_pause_ms=40,
    )
    docs = notes(48)
    writes = [
        {"id": f"w{i}", "text": f"Late note {i} holds the code word zq{i}x."} for i in range(40)
    ]
    revised = {w["id"]: f"{w['text']} Revised." for w in writes}  # updates replace chunks
    queries = ["string instruments", "ice and climate", "pets at home", "railway freight"]
    texts = [d["text"] for d in docs + writes] + list(revised.values())
    vectors = {
        name: (dict(zip(texts, model.encode(texts), strict=True)), model.encode(queries))
        for name, model in (("old", embedder), ("new", new_embedder))
    }

    def made_by(query: str, hits: list[dict[str, Any]]) -> set[str]:
        """The models whose vectors give every score of this answer."""
        models = {"old", "new"}
        q = queries.index(query)
        for hit in hits:
            models &= {
                m
                for m, (by_text, qs) in vectors.items()
                if abs(float(by_text[hit["text"]] @ qs[q]) - hit["score"]) < 2e-3
            }
        assert models, f"no one model made this answer to {query!r}: {hits}"
        return models

    stop = threading.Event()
    answers: list[tuple[float, str, list[dict[str, Any]]]] = []
    failures: list[str] = []
    written: list[str] = []

    def searcher(url: str, k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                query = queries[k % len(queries)]
                k += 1
                started = time.monotonic()
                resp = c.post("/v1/collections/kb/search", json={"query": query, "top_k": 5})
                if resp.status_code != 200:
                    failures.append(f"search {resp.status_code}: {resp.text}")
                else:
                    answers.append((started, query, resp.json()["results"]))

    def writer(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for i, doc in enumerate(writes):
                if stop.is_set():
                    return
                batch = [doc]
                if i >= 3 and i % 3 == 0:
                    earlier = writes[i - 3]
                    batch.append({**earlier, "text": revised[earlier["id"]]})
                resp = c.post("/v1/collections/kb/documents", json={"documents": batch})
                if resp.status_code != 200:
                    failures.append(f"upsert {resp.status_code}: {resp.text}")
                else:
                    written.append(doc["id"])
                time.sleep(0.04)

    with running_server(settings, embedder) as url:
        with httpx.Client(base_url=url, timeout=60) as c:
            resp = c.post("/v1/collections/kb/documents", json={"documents": docs})
            assert resp.status_code == 200, resp.text
        threads = [threading.Thread(target=searcher, args=(url, k)) for k in range(3)]
        threads.append(threading.Thread(target=writer, args=(url,)))
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            with httpx.Client(base_url=url, timeout=60) as c:
                resp = c.post("/v1/collections/kb/reindex", json={"embedding_model": NEW})
                assert resp.status_code == 202, resp.text
                job = wait_reindexed(c)
                swapped = time.monotonic()
                time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert job["state"] == "done", job
        assert not failures, failures[:3]
        kinds = [made_by(query, hits) for _, query, hits in answers]
        assert {"old"} in kinds and {"new"} in kinds, "the searches did not span the swap"
        late = [made_by(q, h) for started, q, h in answers if started > swapped]
        assert late and all("new" in k for k in late)
        assert len(written) >= 5
        with httpx.Client(base_url=url, timeout=60) as c:
            assert collection(c)["embedding_model"] == NEW
            for doc_id in written:
                i = int(doc_id[1:])
                resp = c.post(
                    "/v1/collections/kb/search",
                    json={"query": f"the code word zq{i}x", "top_k": 3},
                )
                hits = resp.json()["results"]
                assert doc_id in {h["document_id"] for h in hits}, (doc_id, hits)
                hit = next(h for h in hits if h["document_id"] == doc_id)
                query = new_embedder.encode([f"the code word zq{i}x"])[0]
                expected = float(new_embedder.encode([hit["text"]])[0] @ query)
                assert hit["score"] == pytest.approx(expected, abs=2e-3)


def test_kill_9_mid_reindex_keeps_the_old_index_and_resumes(
    make_client, tmp_path, models_dir, database_url
):
    """A real server process is killed with SIGKILL mid-reindex; the service started again on
    its store (here, in the test's process) serves the old index while the same job resumes
    from its committed progress, then swaps."""
    data = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    slow = {"reindex_batch_size": 4, "reindex_pause_ms": 150}
    env = {
        "RAG_MODELS_DIR": str(models_dir),
        **{f"RAG_{k.upper()}": str(v) for k, v in slow.items()},
        **({"RAG_DATABASE_URL": database_url} if database_url else {}),
    }
    proc = start_subprocess_server(data, port, **env)
    try:
        wait_http_ready(url, proc)
        with httpx.Client(base_url=url, timeout=60) as c:
            resp = c.post("/v1/collections/kb/documents", json={"documents": notes(64)})
            assert resp.status_code == 200, resp.text
            resp = c.post("/v1/collections/kb/reindex", json={"embedding_model": NEW})
            assert resp.status_code == 202, resp.text
            deadline = time.monotonic() + 60
            while (job := c.get("/v1/collections/kb/reindex").json())["done"] < 12:
                assert time.monotonic() < deadline, job
                time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert job["state"] == "running" and job["done"] < job["total"] == 64

    client = make_client(data_dir=data, models_dir=models_dir, **slow)
    info = collection(client)
    # The old index serves; the same job resumed from its committed progress.
    assert (info["embedding_model"], info["dimension"]) == (OLD, 384)
    resumed = info["reindex"]
    assert resumed["state"] == "running", resumed
    assert resumed["started_at"] == job["started_at"] and resumed["done"] >= job["done"]
    assert "violins" in search(client, "string instruments", top_k=1)[0]["text"]
    done = wait_reindexed(client)
    assert done["state"] == "done" and done["done"] == done["total"] == 64
    info = collection(client)
    assert (info["embedding_model"], info["dimension"]) == (NEW, 128)
    assert "violins" in search(client, "string instruments", top_k=1)[0]["text"]


@pytest.mark.parametrize("database_url", [None])
def test_bad_reindex_requests_are_refused_and_change_nothing(make_client, models_dir):
    client = make_client(models_dir=models_dir, reindex_batch_size=1, reindex_pause_ms=100)
    upsert(client, notes(12))
    assert client.post("/v1/collections", json={"name": "pq", "index": "PQ96"}).status_code == 201
    upsert(client, [{"id": "a", "text": "A short note."}], collection="pq")
    outside = models_dir.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    cases = [
        ({"embedding_model": "nope"}, "embedding_model", "does not exist in the models dir"),
        ({"embedding_model": "../nope"}, "embedding_model", "inside the models directory"),
        ({"embedding_model": str(outside)}, "embedding_model", "is not inside the models dir"),
        ({"embedding_model": "notes"}, "embedding_model", "no modules.json"),
        ({"embedding_model": "cross"}, "embedding_model", "CrossEncoder model"),
        ({"embedding_model": "flagged"}, "embedding_model", "WORSE than its base"),
        ({"embedding_model": OLD}, "embedding_model", "is embedded with"),
        ({"embedding_model": ""}, "embedding_model", ""),
        ({}, "embedding_model", ""),
        ({"embedding_model": NEW, "speed": 2}, "speed", ""),
    ]
    for body, param, words in cases:
        resp = client.post("/v1/collections/kb/reindex", json=body)
        assert resp.status_code == 400, (body, resp.text)
        err = error_of(resp)
        assert err["param"] == param and words in err["message"], (body, err)
    err = error_of(client.post("/v1/collections/pq/reindex", json={"embedding_model": NEW}))
    assert err["param"] == "embedding_model" and "PQ96" in err["message"], err
    resp = client.post("/v1/collections/nope/reindex", json={"embedding_model": NEW})
    assert resp.status_code == 404 and error_of(resp)["param"] == "name"
    for name in ("kb", "pq"):  # nothing was started or changed
        assert client.get(f"/v1/collections/{name}/reindex").status_code == 404
        info = collection(client, name)
        assert (info["embedding_model"], info["dimension"], info["reindex"]) == (OLD, 384, None)

    resp = client.post(
        "/v1/collections/kb/reindex", json={"embedding_model": "flagged", "force": True}
    )
    assert resp.status_code == 202, resp.text
    for other in ("flagged", NEW):  # while it runs, any second request is a conflict
        resp = client.post("/v1/collections/kb/reindex", json={"embedding_model": other})
        assert resp.status_code == 409, resp.text
        err = error_of(resp)
        assert err["code"] == "reindex_in_progress" and err["param"] == "name"
        assert "'kb'" in err["message"] and "flagged" in err["message"]
    assert wait_reindexed(client)["state"] == "done"
    assert collection(client)["embedding_model"] == "flagged"
    assert client.options("/v1/collections/kb/reindex").headers["allow"] == "GET, OPTIONS, POST"

    # A collection dropped mid-reindex takes its job along; its name can be used again.
    upsert(client, notes(6), collection="gone")
    resp = client.post("/v1/collections/gone/reindex", json={"embedding_model": NEW})
    assert resp.status_code == 202, resp.text
    assert client.delete("/v1/collections/gone").status_code == 204
    assert client.get("/v1/collections/gone/reindex").status_code == 404
    upsert(client, notes(2), collection="gone")
    assert collection(client, "gone")["reindex"] is None
    resp = client.post("/v1/collections/gone/reindex", json={"embedding_model": NEW})
    assert resp.status_code == 202, resp.text
    assert wait_reindexed(client, "gone")["total"] == 2


@pytest.mark.parametrize("database_url", [None])
def test_a_collection_of_a_model_this_service_lacks_can_be_moved(make_client, models_dir, tmp_path):
    data = tmp_path / "data"
    first = make_client(data_dir=data, models_dir=models_dir)
    upsert(first, notes(8))
    first.__exit__(None, None, None)
    with sqlite3.connect(data / "rag.sqlite3") as conn:
        conn.execute("UPDATE collections SET embedding_model = 'BAAI/bge-small-en'")
    second = make_client(data_dir=data, models_dir=models_dir)
    resp = second.post("/v1/collections/kb/search", json={"query": "string instruments"})
    assert resp.status_code == 409
    err = error_of(resp)
    assert err["code"] == "embedding_mismatch" and "BAAI/bge-small-en" in err["message"]
    assert "/v1/collections/kb/reindex" in err["message"]
    resp = second.post("/v1/collections/kb/reindex", json={"embedding_model": NEW})
    assert resp.status_code == 202, resp.text
    assert wait_reindexed(second)["state"] == "done"
    assert "violins" in search(second, "string instruments", top_k=1)[0]["text"]


def test_cli_reindex_follows_the_job(models_dir, embedder, tmp_path, capsys):
    settings = Settings(
        data_dir=tmp_path / "data",
        port=free_port(),
        upstream_url="http://127.0.0.1:9/v1",
        upstream_model="none",
        models_dir=models_dir,
    )
    with running_server(settings, embedder) as url:
        resp = httpx.post(f"{url}/v1/collections/kb/documents", json={"documents": notes(16)})
        assert resp.status_code == 200
        assert main(["reindex", "kb", "--model", "nope", "--url", url]) == 1
        assert "does not exist" in capsys.readouterr().err
        argv = ["reindex", "kb", "-m", str(models_dir / NEW), "--wait", "--url", url]
        assert main([*argv, "--no-progress", "--interval", "0.05"]) == 0
        out = capsys.readouterr().out
        assert "started" in out and "kb is embedded with proj128 now (16 vectors)" in out
        vector = httpx.post(f"{url}/v1/embeddings", json={"input": "x", "model": NEW}).json()
        assert np.asarray(vector["data"][0]["embedding"]).shape == (128,)


@pytest.mark.parametrize("database_url", [None])
def test_a_job_whose_model_went_away_fails_and_a_new_one_starts(make_client, models_dir, tmp_path):
    """A job left running by a stopped service resumes at start; when its model is gone by
    then, the job fails saying so, the old model keeps serving, and a new request starts over."""
    own = tmp_path / "models"
    shutil.copytree(models_dir / NEW, own / "temp", copy_function=_link)
    shutil.copytree(models_dir / NEW, own / NEW, copy_function=_link)
    data = tmp_path / "data"
    slow = {"models_dir": own, "reindex_batch_size": 1, "reindex_pause_ms": 200}
    first = make_client(data_dir=data, **slow)
    upsert(first, notes(20))
    resp = first.post("/v1/collections/kb/reindex", json={"embedding_model": "temp"})
    assert resp.status_code == 202, resp.text
    first.__exit__(None, None, None)  # stops the runner; the job stays running in the store
    shutil.rmtree(own / "temp")

    second = make_client(data_dir=data, **slow)
    info = collection(second)
    assert info["embedding_model"] == OLD and info["reindex"]["state"] == "failed"
    assert "temp" in info["reindex"]["error"] and "cannot be loaded" in info["reindex"]["error"]
    assert "violins" in search(second, "string instruments", top_k=1)[0]["text"]
    resp = second.post("/v1/collections/kb/reindex", json={"embedding_model": NEW})
    assert resp.status_code == 202, resp.text
    assert resp.json()["reindex"]["done"] == 0  # another model: started over
    done = wait_reindexed(second)
    assert done["state"] == "done" and done["embedding_model"] == NEW and "error" not in done
