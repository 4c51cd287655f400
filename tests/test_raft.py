"""``rag-train raft``: question writers, example construction in the chat path's exact prompt,
the split by chunk, the evaluation's arithmetic, and a small run against a real service."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from rag_service.chunking import ChunkingConfig
from rag_service.settings import Settings
from tests.support import free_port, running_server
from trainers.data import validate_file
from trainers.evaluate import normalise
from trainers.raft_client import ServiceClient
from trainers.raft_eval import aggregate, beats, citations, score_answerable, score_unanswerable
from trainers.raft_examples import (
    REFUSAL,
    build_example,
    hit_source,
    no_oracle_flags,
    prompt_messages,
    reproduce_chunks,
    sample_chunks,
    split_by_chunk,
)
from trainers.raft_questions import ChunkRef, ModelWriter, QAItem, TemplateWriter

TOPICS = [
    ("harbour", "Harbour Operations", "The harbour master is the officer who assigns berths."),
    ("glacier", "Glacier Survey", "A moraine is the ridge of rock that a glacier pushes ahead."),
    ("orchard", "Orchard Care", "Grafting is the joining of a cutting onto a rooted stock."),
    ("furnace", "Furnace Basics", "The flue is the channel that carries smoke out of a furnace."),
]


def document(key: str, title: str, definition: str) -> dict:
    lines = [title, "=" * len(title), "", definition]
    for i in range(6):
        lines += [
            "",
            f"The {key} logbook entry {i} records that crew {i} checked valve {key}-{i} at "
            f"dawn and found the pressure at {40 + i} units before the morning shift began.",
            f"Inspectors of the {key} site keep the ledger number {1000 + 7 * i} in a locked "
            "cabinet beside the main door.",
        ]
    text = "\n".join(lines)
    return {
        "id": f"{key}.rst",
        "text": text,
        "metadata": {"topic": key, "sections": [[0, title]]},
    }


DOCS = [document(*t) for t in TOPICS]


def ingest(client, collection="raft", chunk_tokens=48):
    resp = client.post(
        "/v1/collections",
        json={"name": collection, "chunk_tokens": chunk_tokens, "chunk_overlap": 8},
    )
    assert resp.status_code == 201, resp.text
    resp = client.post(f"/v1/collections/{collection}/documents", json={"documents": DOCS})
    assert resp.status_code == 200, resp.text


# ---- question writers -------------------------------------------------------------------------
def test_template_writer_is_deterministic_and_quotes_the_chunk(embedder):
    chunks = reproduce_chunks(DOCS, ChunkingConfig(48, 8), embedder)
    first = [TemplateWriter().write(c, 7) for c in chunks]
    again = [TemplateWriter().write(c, 7) for c in reversed(chunks)][::-1]
    assert first == again  # a chunk's question does not depend on the others
    items = [i for i in first if i is not None]
    assert len(items) >= len(chunks) // 2
    kinds = Counter(i.kind for i in items)
    assert kinds["definition"] and kinds["heading"] and kinds["sentence"], kinds
    for item in items:
        s = item.answer_start
        assert item.chunk.text[s : s + len(item.answer)] == item.answer
        assert normalise(item.key_span) in normalise(item.answer)
        assert item.question.endswith("?")
    defs = {i.question for i in items if i.kind == "definition"}
    assert "What is the harbour master?" in defs
    headings = {i.question for c in chunks for i in TemplateWriter().candidates(c)}
    assert "What is said about Glacier Survey?" in headings


def test_model_writer_counts_malformed_replies(make_client, fake_upstream):
    client = make_client()
    chunk = ChunkRef("a", 0, 0, 40, "The vault code is 7421. Only managers use it.")
    other = ChunkRef("b", 0, 0, 30, "Lunch is served from noon.")
    writer = ModelWriter(ServiceClient(client).chat)
    fake_upstream.reply = "Sure! Here is a question: what is the code?"
    assert writer.write(chunk, 1) is None
    fake_upstream.reply = '```json\n{"question": "What is the code?", "answer": 7421}\n```'
    assert writer.write(chunk, 1) is None
    fake_upstream.reply = '{"question": "What is the code?", "answer": "the vault code is 7421"}'
    item = writer.write(chunk, 1)
    assert item is not None and item.answer == "The vault code is 7421"
    assert writer.write(other, 1) is None  # the same answer is not in this chunk
    fake_upstream.mode = "error500"
    assert writer.write(chunk, 1) is None
    assert writer.stats.written == 1
    assert writer.stats.skipped["malformed_json"] == 2
    assert writer.stats.skipped["answer_not_in_chunk"] == 1
    assert sum(v for k, v in writer.stats.skipped.items() if k.startswith("request_failed")) == 1
    sent = fake_upstream.requests[0]
    assert "rag" not in sent and sent["messages"][1]["content"] == chunk.text  # no retrieval


# ---- examples ---------------------------------------------------------------------------------
def _items(n_chunks: int, per_chunk: int = 2) -> list[QAItem]:
    out = []
    for c in range(n_chunks):
        text = f"Fact number {c} is that the code of box {c} is {c * 37}. Other words follow."
        chunk = ChunkRef(f"doc{c % 5}", c, 0, len(text), text)
        for q in range(per_chunk):
            answer = f"the code of box {c} is {c * 37}"
            out.append(
                QAItem(
                    chunk,
                    f"Q{q} about box {c}?",
                    answer,
                    text.find(answer),
                    f"box {c} is {c * 37}",
                    "definition",
                )
            )
    return out


def _hits(item: QAItem, n: int) -> list[dict]:
    """Search results: the oracle among unrelated chunks, and a neighbour that overlaps it."""
    hits = [
        {
            "document_id": "other",
            "chunk_id": 100 + i,
            "text": f"Unrelated text {i}.",
            "score": 0.9 - i / 100,
            "metadata": {},
            "position": i,
            "start": 0,
            "end": 10,
        }
        for i in range(n)
    ]
    c = item.chunk
    oracle = {
        "document_id": c.document_id,
        "chunk_id": 7,
        "text": c.text,
        "score": 0.95,
        "metadata": {},
        "position": c.position,
        "start": c.start,
        "end": c.end,
    }
    neighbour = {
        **oracle,
        "chunk_id": 8,
        "position": c.position + 1,
        "text": "Neighbour text.",
        "start": c.end - 5,
        "end": c.end + 40,
    }
    return [oracle, neighbour, *hits]


def test_oracle_position_no_oracle_share_and_split():
    items = _items(60)
    parts = split_by_chunk(items, val=0.1, test=0.2, seed=3)
    keys = {name: {i.chunk.key for i in part} for name, part in parts.items()}
    assert not (
        keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"]
    )
    assert (len(keys["val"]), len(keys["test"])) == (6, 12)
    assert sum(len(p) for p in parts.values()) == len(items)

    rng = random.Random(0)
    positions: Counter[int] = Counter()
    refusals = 0
    flags = no_oracle_flags(len(items), 0.2, rng)
    assert sum(flags) == round(len(items) * 0.2)
    for item, no_oracle in zip(items, flags, strict=True):
        ex = build_example(item, _hits(item, 6), top_k=4, with_oracle=not no_oracle, rng=rng)
        system, user, assistant = ex.messages
        assert user == {"role": "user", "content": item.question}
        assert ex.meta["sources"] == 4 and system["content"].count("\n[") == 4
        assert "Neighbour text" not in system["content"]  # overlaps the oracle: not a distractor
        if no_oracle:
            refusals += 1
            assert assistant["content"] == REFUSAL and ex.meta["oracle_index"] is None
            assert item.chunk.text not in system["content"]
        else:
            n = ex.meta["oracle_index"]
            positions[n] += 1
            assert assistant["content"] == f"{item.answer} [{n}]"
            assert f"[{n}] (from {item.chunk.document_id})\n{item.chunk.text}" in system["content"]
            assert ex.meta["retrieval_rank"] == 1
    assert refusals == 24
    assert set(positions) == {1, 2, 3, 4}  # every slot is used
    assert min(positions.values()) >= 0.1 * sum(positions.values())

    with pytest.raises(ValueError, match="too few chunks"):
        split_by_chunk(_items(3), val=0.2, test=0.2, seed=0)


def test_sampling_is_stratified_over_documents(embedder):
    chunks = reproduce_chunks(DOCS, ChunkingConfig(48, 8), embedder)
    picked = sample_chunks(chunks, 8, seed=1)
    assert Counter(c.document_id for c in picked) == {d["id"]: 2 for d in DOCS}
    assert picked == sample_chunks(chunks, 8, seed=1)


def test_prompt_is_the_chat_paths(make_client, fake_upstream, embedder):
    """Chunks made here are the service's, and an example's messages are byte for byte the
    messages the service sends its model for the same question and sources."""
    client = make_client()
    ingest(client)
    service = ServiceClient(client)
    info = service.collection("raft")
    docs = [service.document("raft", i) for i in service.document_ids("raft")]
    chunks = reproduce_chunks(
        docs, ChunkingConfig(info["chunk_tokens"], info["chunk_overlap"]), embedder
    )
    assert len(chunks) == info["chunks"] > len(DOCS)
    by_key = {c.key: c for c in chunks}
    question = "Who assigns berths in the harbour?"
    hits = service.search("raft", question, 3)
    for h in hits:
        assert by_key[f"{h['document_id']}#{h['position']}"].text == h["text"]
    resp = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": question}],
            "rag": {"collection": "raft", "top_k": 3},
        },
    )
    assert resp.status_code == 200, resp.text
    sent = fake_upstream.requests[-1]["messages"]
    built = prompt_messages(question, [hit_source(i, h) for i, h in enumerate(hits, 1)])
    assert built == sent
    assert "(from harbour.rst, § Harbour Operations)" in sent[0]["content"]

    # build_example's own prompt is the same function over its chosen order
    oracle = by_key[f"{hits[0]['document_id']}#{hits[0]['position']}"]
    answer = "The harbour master is the officer who assigns berths."
    item = QAItem(oracle, question, answer, oracle.text.find(answer), "the officer who", "x")
    ex = build_example(item, hits, top_k=3, with_oracle=True, rng=random.Random(5))
    n = ex.meta["oracle_index"]
    assert (
        f"[{n}] (from harbour.rst, § Harbour Operations)\n{oracle.text}"
        in ex.messages[0]["content"]
    )
    assert (
        ex.messages[0]["content"].split("\n\nSources:\n")[0]
        == sent[0]["content"].split("\n\nSources:\n")[0]
    )


# ---- evaluation maths ---------------------------------------------------------------------------
META = {
    "reference": "The flue carries smoke out.",
    "key_span": "carries smoke out",
    "document_id": "f",
    "oracle_text": "The flue carries smoke out. More.",
}
SOURCES = [
    {"document_id": "g", "text": "Other."},
    {"document_id": "f", "text": META["oracle_text"]},
]


def test_evaluation_maths():
    assert citations("A [2] and [1], again [2].") == [2, 1]
    good = score_answerable("The flue carries smoke out [2].", SOURCES, META)
    assert good["f1"] == 1.0 and good["key_span"] and good["cites_oracle"]
    wrong = score_answerable("Smoke leaves by the door [1].", SOURCES, META)
    assert wrong["f1"] < 1 and not wrong["key_span"] and wrong["cites_oracle"] is False
    bare = score_answerable("It carries smoke out.", SOURCES, META)
    assert bare["key_span"] and not bare["cited"]
    missed = score_answerable("I do not know.", SOURCES[:1], META)  # oracle not retrieved
    assert missed["retrieved"] is False and missed["cites_oracle"] is None and missed["refused"]
    mixed = score_answerable("Carries smoke out [1][2].", SOURCES, META)
    rows = [
        good,
        wrong,
        bare,
        missed,
        mixed,
        score_unanswerable(REFUSAL),
        score_unanswerable("The sources don't mention it."),
        score_unanswerable("It is 7 [1]."),
    ]
    m = aggregate(rows)
    assert (m["answerable"], m["unanswerable"], m["retrieval_miss"]) == (5, 3, 1)
    assert m["key_span"] == 0.6 and m["citation_rate"] == 0.6
    assert m["cites_oracle"] == 0.5  # good and mixed of the 4 with the chunk retrieved
    assert m["citation_precision"] == 0.5  # [2] [1] [1] [2] -> two of four name the chunk
    assert m["refusal"] == round(2 / 3, 4) and m["false_refusal"] == 0.0
    assert beats({"key_span": 0.7}, {"key_span": 0.6}, "key_span")
    assert not beats({"key_span": 0.6}, {"key_span": 0.6}, "key_span")


# ---- the command against a real service ---------------------------------------------------------
@pytest.fixture(scope="module")
def service(tmp_path_factory, embedder, bundled_model_dir):
    root = tmp_path_factory.mktemp("raft")
    adapters = root / "adapters"
    adapters.mkdir()
    settings = Settings(
        data_dir=root / "data",
        port=free_port(),
        backend="local",
        local_model=str(bundled_model_dir),
        adapters_dir=adapters,
    )
    with running_server(settings, embedder) as url:
        yield url, adapters


def test_bad_collections(service, tmp_path, capsys):
    from trainers.cli import main

    url, _ = service
    assert (
        main(["raft", "--url", url, "--collection", "nope", "--output-dir", str(tmp_path / "x")])
        == 2
    )
    assert "collection 'nope' does not exist" in capsys.readouterr().err
    import httpx

    httpx.post(url + "/v1/collections", json={"name": "empty"}).raise_for_status()
    assert (
        main(["raft", "--url", url, "--collection", "empty", "--output-dir", str(tmp_path / "y")])
        == 2
    )
    assert "is empty" in capsys.readouterr().err


def test_raft_end_to_end(service, bundled_model_dir, capsys):
    import httpx

    from trainers.cli import main

    url, adapters = service
    with httpx.Client(base_url=url, timeout=120) as http:
        ingest(http, "e2e")
    out = adapters / "run"
    argv = [
        "raft",
        "--url",
        url,
        "--collection",
        "e2e",
        "--output-dir",
        str(out),
        "--adapters-dir",
        str(adapters),
        "--base-model",
        str(bundled_model_dir),
        "--max-chunks",
        "10",
        "--top-k",
        "2",
        "--val",
        "0.1",
        "--test",
        "0.3",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-tokens",
        "16",
        "--load",
        "raft-demo",
        "--metric",
        "cites_oracle",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    data = out / "data"
    for name in ("train", "val", "test"):
        good, problems = validate_file(data / f"{name}.jsonl")
        assert good and not problems
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["counts"]["test"]["chunks"] == 3
    report = json.loads((out / "adapter" / "eval.json").read_text())
    for model in ("base", "adapter"):
        assert (
            report[model]["answerable"] + report[model]["unanswerable"]
            == manifest["counts"]["test"]["examples"]
        )
        assert len(report["answers"][model]) == manifest["counts"]["test"]["examples"]
    assert "held-out" in printed.out or "key span present" in printed.out
    served = [a["name"] for a in httpx.get(url + "/v1/adapters").json()["data"]]
    assert not any(n.startswith("raft-eval-") for n in served)  # the temporary one is gone
    if report["better_than_base"]:
        assert report["loaded_as"] == "raft-demo" and "raft-demo" in served
        assert "loaded into the service as 'raft-demo'" in printed.out
    else:
        assert report["loaded_as"] is None and "raft-demo" not in served
        assert "not loaded as 'raft-demo'" in printed.out

    # a rerun reuses the data and the adapter; other data options need --regenerate
    assert main([*argv, "--skip-eval"]) == 0
    err = capsys.readouterr().err
    assert "reusing the data" in err and "reusing the trained adapter" in err
    assert main([*argv[:-4], "--p-no-oracle", "0.5", "--skip-eval"]) == 2
    assert "--regenerate" in capsys.readouterr().err
