"""Moving a collection to another embedding model: POST /v1/collections/{name}/reindex.

The second model is the bundled MiniLM followed by a seeded Dense projection to 128
dimensions: the dimension changes and so does every score, so the scores of an answer tell
which model made it (each one is checked against both models' vectors, computed here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest

from indexes.embedded import EmbeddedCollection, EmbeddedEngine
from indexes.engine import StorageError, StoreUnavailable
from indexes.faiss_index import FaissIndex
from indexes.postgres import PostgresEngine
from indexes.postgres.schema import partition_name
from indexes.protocol import IndexMeta
from indexes.reindex import ModelChanged
from indexes.types import (
    Chunk,
    CollectionOptions,
    CollectionRow,
    DocumentWrite,
    SearchQuery,
    content_hash,
)
from rag_service.batching import MicroBatcher
from rag_service.cli import main
from rag_service.embedders import EmbeddingModels
from rag_service.embedding import Embedder
from rag_service.reindexing import Reindexing
from rag_service.settings import Settings, bundled_embedding_model
from tests.support import (
    ENGINES,
    LANE_SCORE_TOLERANCE,
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
        assert hit["score"] == pytest.approx(expected, abs=LANE_SCORE_TOLERANCE)
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
                assert hit["score"] == pytest.approx(expected, abs=LANE_SCORE_TOLERANCE)


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


def test_cli_reindex_follows_the_job(models_dir, embedder, tmp_path, capsys, monkeypatch):
    settings = Settings(
        data_dir=tmp_path / "data",
        port=free_port(),
        upstream_url="http://127.0.0.1:9/v1",
        upstream_model="none",
        models_dir=models_dir,
    )
    # The working directory holds a directory of the model's name: a bare name still means
    # the one in the service's models directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / NEW).mkdir()
    with running_server(settings, embedder) as url:
        for name, n in (("kb", 16), ("kb2", 4)):
            docs = {"documents": notes(n)}
            resp = httpx.post(f"{url}/v1/collections/{name}/documents", json=docs)
            assert resp.status_code == 200
        assert main(["reindex", "kb", "--model", "nope", "--url", url]) == 1
        assert "does not exist" in capsys.readouterr().err
        argv = ["reindex", "kb", "-m", NEW, "--wait", "--url", url]
        assert main([*argv, "--no-progress", "--interval", "0.05"]) == 0
        out = capsys.readouterr().out
        assert "started" in out and "kb is embedded with proj128 now (16 vectors)" in out
        vector = httpx.post(f"{url}/v1/embeddings", json={"input": "x", "model": NEW}).json()
        assert np.asarray(vector["data"][0]["embedding"]).shape == (128,)
        # A path on this machine inside the models directory is sent absolute.
        assert main(["reindex", "kb2", "-m", str(models_dir / NEW), "--url", url]) == 0
        assert "reindex of kb2 to proj128 (dimension 128) started" in capsys.readouterr().out


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


# ---- the engines' side, driven directly ------------------------------------------------------
def doc_write(
    doc_id: str,
    text: str,
    model: Embedder,
    questions: list[str] | None = None,
    vector: np.ndarray | None = None,
) -> DocumentWrite:
    """A one-chunk document with ``model``'s vectors (``vector`` when given) and known
    questions."""
    return DocumentWrite(
        doc_id,
        text,
        {},
        content_hash(text),
        [Chunk(0, 0, len(text), text)],
        model.encode([text]) if vector is None else vector.reshape(1, -1),
        questions,
        model.encode(questions) if questions else None,
    )


@asynccontextmanager
async def open_engine(
    database_url: str | None, data_dir: Path, **kw: Any
) -> AsyncIterator[EmbeddedEngine | PostgresEngine]:
    engine = PostgresEngine(database_url, **kw) if database_url else EmbeddedEngine(data_dir, **kw)
    await engine.open()
    try:
        yield engine
    finally:
        await engine.close()


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description is not None else []


def test_writes_go_on_while_the_swap_catches_up(embedder, new_embedder, tmp_path, database_url):
    """The swap embeds what writes added (and builds the new index) before it holds writers
    off: a write made while it embeds its catch-up goes through at once (the embed function
    below writes, and would wait for the swap forever). Whatever writes did during the swap,
    the new model's index holds exactly the documents that are left, with the new vectors;
    a write whose vectors came from the old model is then told the model changed."""
    texts = {f"d{i}": f"Note {i}: {TOPICS[i % 4]}." for i in range(12)}
    texts |= {
        "faq": "Open the settings page and choose reset.",
        "late": "Penguins huddle together on the Antarctic ice.",
        "later": "Espresso needs finely ground coffee beans.",
    }
    kw: dict[str, Any] = {"lock_timeout": 2.0} if database_url else {"snapshot_interval_s": 3600}

    async def body() -> None:
        old = dict(zip(texts, embedder.encode(list(texts.values())), strict=True))
        new = dict(zip(texts, new_embedder.encode(list(texts.values())), strict=True))
        async with open_engine(database_url, tmp_path / "data", **kw) as engine:
            first = [doc_write(d, texts[d], embedder, vector=old[d]) for d in texts if d[0] == "d"]
            question = ["How do I recover a lost password?"]
            faq = doc_write("faq", texts["faq"], embedder, question, old["faq"])
            col, _ = await engine.upsert_new(
                CollectionOptions("kb", OLD, 384, "HNSW16"), [*first, faq]
            )
            claim = await engine.reindexer.start("kb", NEW, 128)
            writes = {  # made while the swap embeds (1st and 2nd call): each waits 5 s at most
                1: (doc_write("late", texts["late"], embedder, vector=old["late"]), "d0"),
                2: (doc_write("later", texts["later"], embedder, vector=old["later"]), "d1"),
            }
            calls = 0

            async def embed(batch: list[str]) -> np.ndarray:
                nonlocal calls
                calls += 1
                if calls in writes:
                    added, removed = writes[calls]
                    await asyncio.wait_for(col.upsert([added]), 5)
                    assert await asyncio.wait_for(col.delete(removed), 5)
                return new_embedder.encode(batch)

            row = await claim.swap(embed)
            assert calls > len(writes)
            assert (row.embedding_model, row.dimension) == (NEW, 128)
            assert (
                claim.job.state == "done" and claim.job.done == claim.job.total == 14
            )  # 13 chunks, 1 question

            left = {d for d in texts if d not in ("d0", "d1")}
            query = new_embedder.encode(["string instruments"])
            hits = await col.search(
                SearchQuery("string instruments", query, 50, embedding_model=NEW)
            )
            assert {h.hit.document_id for h in hits} == left
            for h in hits:
                if h.hit.document_id != "faq":  # (a known question may lift its score)
                    expected = float(new[h.hit.document_id] @ query[0])
                    assert h.score == pytest.approx(expected, abs=LANE_SCORE_TOLERANCE), (
                        h.hit.document_id
                    )
            with pytest.raises(ModelChanged):
                await engine.upsert_new(
                    CollectionOptions("kb", OLD, 384),
                    [doc_write("x", "Stale.", embedder, vector=old["d0"])],
                )

    asyncio.run(body())


class SwapAfterSnapshotRead(EmbeddedEngine):
    """Runs ``swap_next`` when a snapshot asks where to write, that is, after it has read the
    index and let go of the read lock: a reindex swap can land exactly there."""

    swap_next: Callable[[], None] | None = None

    def snapshot_paths(self, row: CollectionRow) -> tuple[Path, Path]:
        swap, self.swap_next = self.swap_next, None
        if swap is not None:
            swap()
        return super().snapshot_paths(row)


def test_a_snapshot_taken_across_a_swap_is_labelled_with_its_own_model(
    embedder, new_embedder, tmp_path
):
    """The snapshot records the model of the vectors it holds, even when the swap comes right
    after it read them; the next round writes the new model's index, which a restart loads."""
    data = tmp_path / "data"
    given = notes(10)
    vectors = embedder.encode([d["text"] for d in given])
    docs = [
        doc_write(d["id"], d["text"], embedder, vector=v)
        for d, v in zip(given, vectors, strict=True)
    ]

    async def embed(texts: list[str]) -> np.ndarray:
        return new_embedder.encode(texts)

    async def body() -> None:
        engine = SwapAfterSnapshotRead(data, snapshot_interval_s=3600)
        await engine.open()
        try:
            col, _ = await engine.upsert_new(CollectionOptions("kb", OLD, 384), docs)
            assert isinstance(col, EmbeddedCollection)
            claim = await engine.reindexer.start("kb", NEW, 128)
            loop = asyncio.get_running_loop()
            engine.swap_next = lambda: asyncio.run_coroutine_threadsafe(
                claim.swap(embed), loop
            ).result(60)
            assert await asyncio.to_thread(engine.snapshot, col)
            assert col.row.embedding_model == NEW  # the swap happened in the snapshot's midst
            path, meta_path = engine.snapshot_paths(col.row)
            recorded = json.loads(meta_path.read_text())["meta"]
            assert (recorded["embedding_model"], recorded["dimension"]) == (OLD, 384)
            old = FaissIndex.load(path, IndexMeta(OLD, 384, "Flat"))  # what it holds: old
            assert len(old) == 10
            assert col.dirty and await asyncio.to_thread(engine.snapshot, col)
            assert len(FaissIndex.load(path, IndexMeta(NEW, 128, "Flat"))) == 10
        finally:
            await engine.close()
        again = EmbeddedEngine(data, snapshot_interval_s=3600)
        await again.open()
        try:
            assert [(r.from_snapshot, r.added_from_store) for r in again.reports] == [(10, 0)]
        finally:
            await again.close()

    asyncio.run(body())


def test_resume_gives_up_the_claims_it_did_not_hand_to_a_runner(embedder, models_dir, tmp_path):
    """Jobs left running whose model is gone are failed at resume; while the store is too busy
    to record that, resume gives their claims up, so the next look takes them again."""
    data = tmp_path / "data"
    settings = Settings(data_dir=data, models_dir=models_dir, upstream_url="http://127.0.0.1:9/v1")

    async def body() -> None:
        async with open_engine(None, data, busy_timeout_ms=50, snapshot_interval_s=3600) as engine:
            for name in ("a", "b"):
                await engine.upsert_new(
                    CollectionOptions(name, OLD, 384), [doc_write(name, "A note.", embedder)]
                )
                claim = await engine.reindexer.start(name, "gone", 128)
                await claim.release()  # running, with no runner: as a crash leaves it
            models = EmbeddingModels.serving(settings, embedder, MicroBatcher(embedder.encode))
            reindexing = Reindexing(settings, engine, models)
            busy = sqlite3.connect(data / "rag.sqlite3", isolation_level=None)
            try:
                busy.execute("BEGIN IMMEDIATE")  # the store cannot record the failures
                with contextlib.suppress(StorageError):
                    await reindexing.resume()
            finally:
                busy.execute("ROLLBACK")
                busy.close()
            assert {j.state for j in await engine.reindexer.jobs()} == {"running"}
            assert await reindexing.resume() == []  # both claimed again, and failed now
            jobs = await engine.reindexer.jobs()
            assert [(j.collection, j.state) for j in jobs] == [("a", "failed"), ("b", "failed")]
            assert all("cannot be loaded" in (j.error or "") for j in jobs)

    asyncio.run(body())


def test_stalled_gives_up_its_claims_when_a_later_one_fails(embedder, pg_cluster):
    """Two jobs wait for a runner; the connection for the second claim is refused (the role's
    connection limit): the first claim is given up, not kept from every replica."""
    suffix = uuid.uuid4().hex[:10]
    role, dbname = f"reindexer_{suffix}", f"t_{suffix}"
    admin = pg_cluster.url()
    sql(admin, f"CREATE ROLE {role} LOGIN")
    sql(admin, f"CREATE DATABASE {dbname} OWNER {role}")
    sql(pg_cluster.url(dbname), "CREATE EXTENSION vector")
    url = pg_cluster.url(dbname).replace("postgres:@", f"{role}:@")
    held = (
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND a.usename = %s"
    )

    async def body() -> None:
        async with open_engine(url, Path(), pool_min=1, pool_max=1, listen=False) as engine:
            assert isinstance(engine, PostgresEngine)
            for name in ("a", "b"):
                await engine.upsert_new(
                    CollectionOptions(name, OLD, 384), [doc_write(name, "A note.", embedder)]
                )
                claim = await engine.reindexer.start(name, NEW, 128)
                await claim.release()
            deadline = time.monotonic() + 10  # only the pool's connection is left
            count = "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
            while sql(admin, count, (role,)) != [(1,)]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            sql(admin, f"ALTER ROLE {role} CONNECTION LIMIT 2")  # the pool's and one claim
            try:
                with pytest.raises(StoreUnavailable, match="too many connections") as failed:
                    await engine.reindexer.stalled()
                assert sql(admin, held, (role,)) == [(0,)]
                del failed
            finally:
                sql(admin, f"ALTER ROLE {role} CONNECTION LIMIT -1")
            claims = await engine.reindexer.stalled()
            assert sorted(c.job.collection for c in claims) == ["a", "b"]
            for claim in claims:
                await claim.release()

    asyncio.run(body())


def test_stalled_builds_missing_hnsw_indexes_in_the_background(embedder, pg_cluster):
    """An HNSW index that a crash kept a swap from building again is built by a background
    task: looking for stalled jobs (at every start) does not wait for the build."""
    url = pg_cluster.create_database()
    valid = (
        "SELECT x.indisvalid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "WHERE i.relname = %s"
    )

    async def body() -> None:
        async with open_engine(url, Path(), listen=False) as engine:
            col, _ = await engine.upsert_new(
                CollectionOptions("kb", OLD, 384, "HNSW16"), [doc_write("a", "A note.", embedder)]
            )
            table = partition_name(col.row.id)
            sql(url, f"DROP INDEX {table}_hnsw")  # a crash after the swap's commit
            with psycopg.connect(url) as blocker:  # the build waits for this lock
                blocker.execute(f"LOCK TABLE {table} IN SHARE UPDATE EXCLUSIVE MODE")
                assert await asyncio.wait_for(engine.reindexer.stalled(), 10) == []
                await asyncio.sleep(0.2)
                assert sql(url, valid, (f"{table}_hnsw",)) in ([], [(False,)])
                blocker.rollback()
            deadline = time.monotonic() + 30
            while sql(url, valid, (f"{table}_hnsw",)) != [(True,)]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)

    asyncio.run(body())
