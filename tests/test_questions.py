"""Known questions as keys: upsert semantics, search, attach endpoint and CLI, on both engines."""

from __future__ import annotations

import json
import shutil
import threading
import time
from functools import partial

import pytest

from indexes.questions import QuestionWrite
from rag_service.answers import find_answers
from rag_service.cli import main
from rag_service.questions import embed_texts
from rag_service.schemas import MAX_QUESTIONS_PER_DOCUMENT
from rag_service.settings import Settings
from tests.support import (
    ENGINES,
    LANE_SCORE_TOLERANCE,
    engine_database_url,
    error_of,
    free_port,
    running_server,
)
from tests.test_documents import search, upsert
from tests.test_reindex import NEW, models_dir, wait_reindexed  # noqa: F401


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Every test of this module runs on both storage engines."""
    return engine_database_url(request)


FACTS = [
    ("paris", "Paris is the capital of France and home to the Eiffel Tower.", "geo"),
    ("python", "Python is a programming language created by Guido van Rossum.", "tech"),
    ("rust", "Rust is a systems programming language focused on memory safety.", "tech"),
    ("nile", "The Nile is the longest river in Africa.", "geo"),
    ("coffee", "Espresso is brewed by forcing hot water through finely ground coffee.", "food"),
]
TEXT = dict((i, t) for i, t, _ in FACTS)
# Worded unlike the Rust document: plain dense search ranks the Python one first, while the
# known question of the Rust document is close to it (the bundled model: 0.44 vs 0.32, 0.88).
QUERY = "What programming language came out of Mozilla?"
KNOWN = "Which language did Mozilla create?"


def docs(**questions):
    return [
        {"id": i, "text": t, "metadata": {"topic": topic}}
        | ({"questions": questions[i]} if i in questions else {})
        for i, t, topic in FACTS
    ]


def doc(doc_id, text=None, **fields):
    """One of :data:`FACTS` as an upsert row (its metadata included), text and fields changed."""
    _, original, topic = next(f for f in FACTS if f[0] == doc_id)
    return {"id": doc_id, "text": text or original, "metadata": {"topic": topic}, **fields}


def debug_search(client, query, collection="kb", **kw):
    return search(client, query, collection, debug=True, **kw)


def info(client, name="kb"):
    resp = client.get("/v1/collections")
    return next(c for c in resp.json()["data"] if c["name"] == name)


def stored_questions(client, doc_id, collection="kb"):
    resp = client.get(f"/v1/collections/{collection}/documents/{doc_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()["questions"]


def test_known_question_finds_its_document(client):
    upsert(client, docs())
    plain = debug_search(client, QUERY, top_k=3)
    assert plain[0]["document_id"] == "python"
    assert all(r["matched"] == "chunk" and "question" not in r["scores"] for r in plain)
    rust_plain = next(r for r in plain if r["document_id"] == "rust")

    out = upsert(client, [doc("rust", questions=[KNOWN])])
    assert out["rust"] == {"id": "rust", "chunks": 1, "status": "updated"}
    assert stored_questions(client, "rust") == [KNOWN]
    assert info(client)["questions"] == 1

    lifted = debug_search(client, QUERY, top_k=3)
    top = lifted[0]
    assert top["document_id"] == "rust" and top["matched"] == "question"
    assert top["chunk_id"] == rust_plain["chunk_id"]  # the document's chunk, not the question
    assert top["text"] == TEXT["rust"]
    assert top["scores"]["question"] == pytest.approx(top["score"], abs=1e-5)
    assert top["scores"]["question"] > top["scores"]["chunk"]
    assert top["scores"]["chunk"] == pytest.approx(rust_plain["score"], abs=1e-4)
    assert lifted[1]["document_id"] == "python" and lifted[1]["matched"] == "chunk"
    ids = [r["document_id"] for r in lifted]
    assert len(ids) == len(set(ids)) == 3  # no second result for the lifted chunk

    assert [r["document_id"] for r in search(client, QUERY, top_k=1)] == ["rust"]
    assert "matched" not in search(client, QUERY)[0]  # debug only
    hybrid = debug_search(client, QUERY, top_k=3, mode="hybrid")
    assert hybrid[0]["document_id"] == "rust" and hybrid[0]["matched"] == "question"
    # A filter applies to the question keys too.
    tech = search(client, QUERY, filter={"topic": "tech"})
    assert [r["document_id"] for r in tech] == ["rust", "python"]
    geo = search(client, QUERY, filter={"topic": "geo"}, top_k=5)
    assert {r["document_id"] for r in geo} == {"paris", "nile"}
    # min_score applies to the lifted score.
    cut = lifted[0]["score"] - 1e-4
    assert [r["document_id"] for r in search(client, QUERY, min_score=cut)] == ["rust"]


def test_upsert_keeps_replaces_and_clears_questions(client):
    upsert(client, docs(rust=[KNOWN, "which language did mozilla create?  ", "Who made Rust?"]))
    assert stored_questions(client, "rust") == [KNOWN, "Who made Rust?"]  # repeats dropped
    chunk_id = search(client, QUERY, top_k=1)[0]["chunk_id"]

    # Re-ingest of the same text, questions left out: unchanged, and they stay.
    again = upsert(client, docs())
    assert {d["status"] for d in again.values()} == {"unchanged"}
    assert stored_questions(client, "rust") == [KNOWN, "Who made Rust?"]
    assert debug_search(client, QUERY)[0]["matched"] == "question"
    # The same questions again: unchanged too.
    same = upsert(client, [doc("rust", questions=[KNOWN, "Who made Rust?"])])
    assert same["rust"]["status"] == "unchanged"

    # Only the questions change: "updated", chunks kept (same chunk id, nothing re-chunked).
    embedded_before = _chunks_embedded(client)
    resp = client.post(
        "/v1/collections/kb/documents?debug=true",
        json={"documents": [doc("rust", questions=["Who made Rust?"])]},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["documents"][0]["status"] == "updated"
    assert "embed_questions" in resp.json()["timings_ms"]
    assert _chunks_embedded(client) == embedded_before
    assert stored_questions(client, "rust") == ["Who made Rust?"]
    top = debug_search(client, QUERY)[0]
    assert top["document_id"] == "python"  # the Mozilla question is gone
    assert debug_search(client, "Who made Rust?")[0]["chunk_id"] == chunk_id

    # New text, questions left out: the text is re-embedded and the questions survive.
    edited = "Rust is a systems programming language with an ownership model."
    out = upsert(client, [doc("rust", edited)])
    assert out["rust"]["status"] == "updated"
    assert stored_questions(client, "rust") == ["Who made Rust?"]
    top = debug_search(client, "Who made Rust?")[0]
    assert top["document_id"] == "rust" and top["text"] == edited

    # [] clears them.
    upsert(client, [doc("rust", edited, questions=[])])
    assert stored_questions(client, "rust") == []
    assert info(client)["questions"] == 0
    assert all(r["matched"] == "chunk" for r in debug_search(client, "Who made Rust?", top_k=5))


def _chunks_embedded(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("rag_chunks_embedded_total "):
            return float(line.split()[1])
    return 0.0


def test_delete_removes_questions(client):
    upsert(client, docs(rust=[KNOWN], python=["Who is Guido?"]))
    assert info(client)["questions"] == 2
    assert client.delete("/v1/collections/kb/documents/rust").status_code == 204
    assert info(client)["questions"] == 1
    assert all(r["document_id"] != "rust" for r in search(client, QUERY, top_k=5))
    # The same id again without questions: the old question keys are gone for good.
    upsert(client, [doc("rust")])
    assert stored_questions(client, "rust") == []
    assert debug_search(client, QUERY)[0]["document_id"] == "python"
    # Dropping the collection takes the rest.
    assert client.delete("/v1/collections/kb").status_code == 204
    upsert(client, docs())
    assert info(client)["questions"] == 0
    assert stored_questions(client, "python") == []


def test_restart_restores_question_keys(make_client, tmp_path, database_url):
    data = tmp_path / "data"
    first = make_client(data_dir=data)
    upsert(first, docs(rust=[KNOWN]))
    first.__exit__(None, None, None)  # a clean shutdown writes the index snapshot

    second = make_client(data_dir=data)
    top = debug_search(second, QUERY)[0]
    assert (top["document_id"], top["matched"]) == ("rust", "question")
    assert info(second)["questions"] == 1
    if database_url is not None:
        return  # postgres holds everything in the database: no index to restore
    report = second.get("/ready").json()["restore"][0]
    assert (report["from_snapshot"], report["added_from_store"]) == (6, 0)  # 5 chunks + 1
    assert 'rag_index_vectors{collection="kb"} 6.0' in second.get("/metrics").text
    # A question written after the snapshot, then a stop that skips the exit snapshot.
    attach = {"questions": [{"question": "Who is Guido?", "document_id": "python"}]}
    assert second.post("/v1/collections/kb/questions", json=attach).status_code == 200
    second.app.state["kb"].engine.get("kb").dirty = False
    second.__exit__(None, None, None)

    third = make_client(data_dir=data)
    report = third.get("/ready").json()["restore"][0]
    assert (report["from_snapshot"], report["added_from_store"], report["reembedded"]) == (6, 1, 0)
    assert debug_search(third, "Who is Guido?")[0]["matched"] == "question"
    third.__exit__(None, None, None)

    shutil.rmtree(data / "indexes")  # no snapshot at all: rebuilt from the store
    fourth = make_client(data_dir=data)
    report = fourth.get("/ready").json()["restore"][0]
    assert (report["from_snapshot"], report["added_from_store"]) == (0, 7)
    top = debug_search(fourth, QUERY)[0]
    assert (top["document_id"], top["matched"]) == ("rust", "question")


def test_attach_endpoint(client):
    upsert(client, docs())
    resp = client.post(
        "/v1/collections/kb/questions",
        json={
            "questions": [
                {"question": KNOWN, "document_id": "rust"},
                {"question": "which language did Mozilla create?", "document_id": "rust"},
                {"question": "What is the longest river?", "answer": "the longest river in africa"},
                {"question": "Which one is a language?", "answer": "programming language"},
                {"question": "Is there a moon base?", "answer": "a moon base"},
            ]
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["added"] == 2
    assert {d["id"]: (d["added"], d["questions"]) for d in body["documents"]} == {
        "rust": (1, 1),
        "nile": (1, 1),
    }
    assert [(u["row"], u["reason"]) for u in body["unmatched"]] == [
        (3, "ambiguous"),
        (4, "no_match"),
    ]
    assert set(body["unmatched"][0]["documents"]) == {"python", "rust"}
    assert stored_questions(client, "rust") == [KNOWN]
    assert info(client)["questions"] == 2
    assert debug_search(client, QUERY)[0]["matched"] == "question"

    # Appending again: duplicates dropped, nothing added.
    resp = client.post(
        "/v1/collections/kb/questions",
        json={"questions": [{"question": KNOWN.upper(), "document_id": "rust"}]},
    )
    assert resp.json()["added"] == 0 and resp.json()["documents"][0]["questions"] == 1

    # An unknown document: 404 naming the row, and the valid row before it is not written.
    resp = client.post(
        "/v1/collections/kb/questions",
        json={
            "questions": [
                {"question": "Who is Guido?", "document_id": "python"},
                {"question": "Who?", "document_id": "nobody"},
            ]
        },
    )
    assert resp.status_code == 404, resp.text
    assert error_of(resp)["param"] == "questions[1].document_id"
    assert stored_questions(client, "python") == []
    assert (
        client.post(
            "/v1/collections/missing/questions",
            json={"questions": [{"question": "x", "document_id": "a"}]},
        ).status_code
        == 404
    )


def test_engines_drop_repeats_by_the_normalised_key(client):
    """What two concurrent attaches of one question in two wordings hand the engine (each
    passed the service's own check before the other wrote): the second is not stored."""
    upsert(client, docs())
    kb = client.app.state["kb"]

    async def add(texts):
        collection = await kb.collection("kb")
        vectors = await embed_texts(kb, texts)
        writes = [QuestionWrite("rust", texts, vectors)]
        return await collection.add_questions(writes, limit=MAX_QUESTIONS_PER_DOCUMENT)

    first = client.blocking_portal.call(add, ["What is X?"])
    second = client.blocking_portal.call(add, ["what  is x?", "Who made Rust?", "WHO MADE RUST?"])
    assert (first.added, first.totals) == ({"rust": 1}, {"rust": 1})
    assert (second.added, second.totals) == ({"rust": 1}, {"rust": 2})
    assert stored_questions(client, "rust") == ["What is X?", "Who made Rust?"]
    assert info(client)["questions"] == 2


def test_find_answers_reads_every_page(client):
    """The answer matching shared by attach and evaluate, a few documents a page."""
    upsert(client, docs())  # ids in order: coffee nile paris python rust
    collection = client.blocking_portal.call(client.app.state["kb"].collection, "kb")
    answers = {
        0: "ESPRESSO  is brewed",  # first page
        1: "memory safety",  # last page
        2: "programming language",  # python and rust: two pages
        3: "a moon base",
        4: "   ",
    }
    for page in (1, 2, 500):
        found = client.blocking_portal.call(partial(find_answers, collection, answers, page=page))
        assert found == {0: ["coffee"], 1: ["rust"], 2: ["python", "rust"], 3: [], 4: []}, page


def test_questions_are_scored_only_where_a_collection_has_some(make_client, tmp_path, database_url):
    """A collection without questions skips their query; with postgres, a question another
    replica attached is found although this replica's cached counter still says none."""
    first = make_client(data_dir=tmp_path / "a")
    upsert(first, docs())

    def timings(client):
        resp = client.post("/v1/collections/kb/search", json={"query": QUERY, "debug": True})
        assert resp.status_code == 200, resp.text
        return resp.json()["timings_ms"]

    assert "questions" not in timings(first)
    other = make_client(data_dir=tmp_path / "b") if database_url else first
    attach = {"questions": [{"question": KNOWN, "document_id": "rust"}]}
    assert other.post("/v1/collections/kb/questions", json=attach).status_code == 200
    top = debug_search(first, QUERY)[0]
    assert (top["document_id"], top["matched"]) == ("rust", "question")
    if database_url:
        assert "questions" in timings(first)


def test_model_changed_is_reported_as_what_happened():
    from indexes.engine import StaleWrite
    from indexes.reindex import ModelChanged
    from rag_service.errors import Overloaded, from_storage

    error = from_storage(ModelChanged("collection 'kb' is embedded with b now, not a"))
    assert isinstance(error, Overloaded) and error.status_code == 503
    assert "a reindex moved the collection to another embedding model" in str(error)
    assert "kept winning" not in str(error)
    assert "kept winning" in str(from_storage(StaleWrite("document 'x' changed")))


def test_an_attach_racing_a_reindex_swap_is_embedded_again(
    make_client,
    database_url,
    models_dir,  # noqa: F811  (the fixture imported from tests.test_reindex)
):
    """The race, made certain: the test holds the collection's writer lock, so the reindex's
    swap queues on it, then an attach (embedded by the old model) queues behind the swap.
    Released, the swap moves the collection to the new model, the engine refuses the
    attach's old-model vectors (ModelChanged), and the attach embeds them again: 200."""
    if database_url is not None:
        pytest.skip("the embedded engine's writer lock orders the race")
    client = make_client(models_dir=models_dir)
    upsert(client, docs())
    portal = client.blocking_portal
    writer = client.app.state["kb"].engine.get("kb").writer

    def queued(n):
        deadline = time.monotonic() + 60
        while len(writer._waiters or ()) < n:  # asyncio.Lock's queue of waiting tasks
            assert time.monotonic() < deadline, "nothing queued on the writer lock"
            time.sleep(0.01)

    answers: list = []
    attach = {"questions": [{"question": KNOWN, "document_id": "rust"}]}
    thread = threading.Thread(
        target=lambda: answers.append(client.post("/v1/collections/kb/questions", json=attach))
    )
    portal.call(writer.acquire)
    try:
        resp = client.post("/v1/collections/kb/reindex", json={"embedding_model": NEW})
        assert resp.status_code == 202, resp.text
        queued(1)  # the swap
        thread.start()
        queued(2)  # the attach, its questions embedded by the old model
        assert info(client)["embedding_model"] != NEW
    finally:
        portal.call(writer.release)
    thread.join(60)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert answers[0].json()["added"] == 1
    assert wait_reindexed(client)["state"] == "done"
    assert info(client)["embedding_model"] == NEW
    top = debug_search(client, KNOWN)[0]
    assert (top["document_id"], top["matched"]) == ("rust", "question")
    assert top["scores"]["question"] == pytest.approx(
        1.0, abs=LANE_SCORE_TOLERANCE
    )  # a new-model vector


@pytest.mark.parametrize(
    ("questions", "param"),
    [
        ([""], "documents[1].questions[0]"),
        (["   "], "documents[1].questions[0]"),
        (["ok", "x" * 1001], "documents[1].questions[1]"),
        (["bad\x00"], "documents[1].questions[0]"),
        ([f"q{i}" for i in range(MAX_QUESTIONS_PER_DOCUMENT + 1)], "documents[1].questions"),
        ("one", "documents[1].questions"),
    ],
)
def test_bad_questions_on_upsert(client, questions, param):
    resp = client.post(
        "/v1/collections/kb/documents",
        json={
            "documents": [
                {"id": "a", "text": "A valid document."},
                {"id": "b", "text": "Another one.", "questions": questions},
            ]
        },
    )
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["param"] == param
    assert client.get("/v1/collections/kb/documents/a").status_code == 404  # nothing written


def test_bad_attach_requests(client):
    upsert(client, docs(rust=[f"q{i}" for i in range(MAX_QUESTIONS_PER_DOCUMENT - 1)]))
    cases = [
        ({"questions": []}, 400, "questions"),
        ({"questions": [{"question": " ", "document_id": "rust"}]}, 400, "questions[0].question"),
        ({"questions": [{"question": "x"}]}, 400, "questions[0].document_id"),
        (
            {"questions": [{"question": "x", "document_id": "rust", "answer": "Rust"}]},
            400,
            "questions[0].document_id",
        ),
        (
            {
                "questions": [
                    {"question": "one more", "document_id": "rust"},
                    {"question": "Who is Guido?", "document_id": "python"},
                    {"question": "and another", "document_id": "rust"},
                ]
            },
            400,
            "questions[2].question",
        ),
    ]
    for body, status, param in cases:
        resp = client.post("/v1/collections/kb/questions", json=body)
        assert resp.status_code == status, (body, resp.text)
        assert error_of(resp)["param"] == param, body
    assert len(stored_questions(client, "rust")) == MAX_QUESTIONS_PER_DOCUMENT - 1
    assert stored_questions(client, "python") == []  # the refused batch wrote nothing
    assert info(client)["questions"] == MAX_QUESTIONS_PER_DOCUMENT - 1


@pytest.fixture
def server(tmp_path, embedder, fake_server, database_url):
    settings = Settings(
        data_dir=tmp_path / "data",
        port=free_port(),
        upstream_url=fake_server.url,
        database_url=database_url,
    )
    with running_server(settings, embedder) as url:
        yield url


def test_cli_questions_add(server, tmp_path, capsys):
    import httpx

    httpx.post(f"{server}/v1/collections/kb/documents", json={"documents": docs()}, timeout=60)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "\n".join(
            json.dumps(row)
            for row in [
                {"question": KNOWN, "document_id": "rust"},
                {"question": "Where is the Eiffel Tower?", "answer": "home to the Eiffel Tower"},
                {"question": "Name a language", "document_ids": ["python", "rust"]},
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "How is espresso made?"},
                        {
                            "role": "assistant",
                            "content": "By forcing hot water through finely ground coffee.",
                        },
                        {"role": "user", "content": "Thanks!"},
                        {"role": "assistant", "content": "You are welcome."},
                    ]
                },
            ]
        )
        + "\n"
    )
    common = ["--url", server, "--collection", "kb"]
    assert main(["questions", "add", str(qa), *common]) == 0
    captured = capsys.readouterr()
    assert "6 questions: 5 added to 4 documents, 0 already there, 1 unmatched" in captured.out
    assert f"{qa}:4: left out, the answer is in no document" in captured.err
    with httpx.Client(base_url=server) as http:
        doc = http.get("/v1/collections/kb/documents/rust").json()
        assert doc["questions"] == [KNOWN, "Name a language"]
        assert http.get("/v1/collections/kb/documents/coffee").json()["questions"] == [
            "How is espresso made?"
        ]
        body = {"query": QUERY, "debug": True}
        top = http.post("/v1/collections/kb/search", json=body).json()["results"][0]
        assert (top["document_id"], top["matched"]) == ("rust", "question")

    assert main(["questions", "add", str(qa), *common]) == 0  # again: all there already
    assert "0 added to 0 documents, 5 already there" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\nnot json\n')
    assert main(["questions", "add", str(bad), *common]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1:" in err and f"{bad}:2: not JSON" in err
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(
        json.dumps({"question": "a", "document_id": "rust"})
        + "\n"
        + json.dumps({"question": "b", "document_id": "ghost"})
        + "\n"
    )
    assert main(["questions", "add", str(unknown), *common]) == 1
    assert f"(404) at {unknown}:2" in capsys.readouterr().err
