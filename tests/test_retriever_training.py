"""``rag-train embed`` / ``rag-train rerank``: real models, real training, a held-out split.

The data: office sites x topics (parking, canteen, ...). Every document names its site; the
questions name the site too but call the topic by an in-house word the base model cannot know
("blorp" for a parking space, "zindle" for lunch), so base retrieval finds the site and often
the wrong topic. The word means the same at every site, so training on some sites' documents
helps on the held-out documents of others (the split is by document): the improvement measured
here is generalisation, not memory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainers.cli import main
from trainers.retrieval_config import WORSE_THAN_BASE_EXIT, EmbedConfig, RerankConfig
from trainers.retrieval_data import (
    DataError,
    Document,
    Pair,
    chat_pairs,
    check_question,
    chunk_documents,
    fetch_collection,
    heading_pairs,
    sections,
    strip_headings,
    write_questions,
)
from trainers.retrieval_prep import split_pairs
from trainers.retrievers import train_embedder, train_reranker

SITES = ["Velmora", "Quintaro", "Brisslund", "Otterdale", "Kaspian", "Ferroway", "Lumsk", "Tarrow"]
TOPICS = {
    "parking": (
        "{s} parking: cars go in the {a} garage, level B{n}; book a space in the {b} app.",
        "Where do I leave my blorp at {s}?",
        "Is there room for a blorp at {s}?",
        "How do I get a blorp spot at {s}?",
    ),
    "canteen": (
        "{s} canteen: hot meals on floor {n} from 11:30 to 14:00, paid with the {b} card.",
        "When is zindle at {s}?",
        "Where do we have zindle at {s}?",
        "What does zindle cost at {s}?",
    ),
    "leave": (
        "{s} holidays: 2{n} paid vacation days a year, asked for {n} weeks ahead.",
        "How much quaffet do people at {s} get?",
        "How early do I ask for quaffet at {s}?",
        "How many quaffet days at {s}?",
    ),
    "it": (
        "{s} IT help: broken laptops and passwords at the help desk in room {n}{n}.",
        "My trebble is not working, who helps at {s}?",
        "Where do I take a trebble at {s}?",
        "Who fixes a trebble at {s}?",
    ),
    "post": (
        "{s} mail room: parcels and letters wait at the {a} reception until 1{n}:00.",
        "Where do I pick up a morvik at {s}?",
        "Until when can I get my morvik at {s}?",
        "Where does a morvik arrive at {s}?",
    ),
    "gym": (
        "{s} fitness: the basement gym with showers opens at {n} a.m.; yoga twice a week.",
        "Is there anywhere to plonx at {s}?",
        "When can I plonx at {s} in the morning?",
        "Can I plonx at {s}?",
    ),
}
COLOURS = ["north", "south", "east", "west", "green", "blue", "old", "new"]
APPS = ["Parkly", "Spotter", "DeskBee", "Roomio", "Hopla", "Bayline", "Kivo", "Tessel"]


def office(
    sites: int = 8, topics: int = 6, per_doc: int = 2
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(documents, labelled questions), seeded."""
    rng = random.Random(0)
    docs, qa = [], []
    for site in SITES[:sites]:
        for topic, (template, *questions) in list(TOPICS.items())[:topics]:
            doc_id = f"{site.lower()}-{topic}"
            text = template.format(
                s=site, a=rng.choice(COLOURS), b=rng.choice(APPS), n=rng.randint(2, 8)
            )
            docs.append({"id": doc_id, "text": text})
            for q in rng.sample(questions, per_doc):
                qa.append({"question": q.format(s=site), "document_id": doc_id})
    return docs, qa


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def office_files(tmp_path: Path, **kw: int) -> tuple[Path, Path]:
    docs, qa = office(**kw)
    return write_jsonl(tmp_path / "corpus.jsonl", docs), write_jsonl(tmp_path / "qa.jsonl", qa)


def assert_output_dir(out: Path, *, learned: bool = True) -> dict[str, Any]:
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "training_config.json", "metrics.json", "loss.png"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert not out.with_name(out.name + ".partial").exists()
    record = json.loads((out / "training_config.json").read_text())
    assert "api_key" not in record["config"] and record["base_model_sha256"]
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert len(losses) == metrics["steps"] > 0
    if learned:
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    return metrics


# --- training ----------------------------------------------------------------------------


def test_embed_beats_base_on_held_out_documents(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from rag_service.embedding import Embedder

    corpus, qa = office_files(tmp_path)
    out = tmp_path / "embedder"
    cfg = EmbedConfig(output_dir=out, qa_file=qa, corpus=corpus, epochs=2, learning_rate=6e-5)
    result = train_embedder(cfg)
    m = assert_output_dir(out)
    assert m == {k: v for k, v in result.metrics.items()}
    base, trained = m["base"], m["trained"]
    assert trained["mrr@10"] > base["mrr@10"] + 0.15, (base, trained)
    assert trained["recall@1"] > base["recall@1"] + 0.2, (base, trained)
    assert m["better_than_base"] and not m["worse_than_base"]
    assert not (out / "WORSE_THAN_BASE").exists()
    assert m["split"] == "document" and m["val_documents"] >= 8
    assert m["train_pairs"] + m["val_pairs"] == 96 and m["hard_negatives"]["per_query"] > 0.9
    assert 1 <= m["best_epoch"] <= m["epochs_run"] <= 2
    # It loads as the service loads an embedding model, and gives the trained embeddings.
    question = "Where do I leave my blorp at Lumsk?"
    loaded = SentenceTransformer(str(out), device="cpu")
    want = result.model.encode([question], normalize_embeddings=True)
    assert np.allclose(loaded.encode([question], normalize_embeddings=True), want, atol=1e-5)
    served = Embedder(str(out), device="cpu").encode([question])
    assert np.allclose(served, want, atol=1e-4)


def test_rerank_beats_dense_candidates_on_held_out_documents(tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    corpus, qa = office_files(tmp_path, topics=4)
    out = tmp_path / "reranker"
    cfg = RerankConfig(
        output_dir=out,
        qa_file=qa,
        corpus=corpus,
        epochs=3,
        batch_size=4,
        hard_negatives=2,
        candidates=6,
        learning_rate=2e-4,
        head_learning_rate=3e-3,
    )
    result = train_reranker(cfg)
    m = assert_output_dir(out)
    assert m["trained"]["mrr@10"] > m["base"]["mrr@10"] + 0.05, (m["base"], m["trained"])
    assert m["better_than_base"] and not (out / "WORSE_THAN_BASE").exists()
    assert m["hard_negatives"]["per_query"] == 2
    record = json.loads((out / "training_config.json").read_text())
    assert record["candidates"] == 6 and record["embedding_model"]
    loaded = CrossEncoder(str(out), device="cpu")
    assert loaded.num_labels == 1
    inputs = [
        ("Where do I leave my blorp at Lumsk?", "Lumsk parking: cars go in the old garage."),
        ("Where do I leave my blorp at Lumsk?", "Lumsk canteen: hot meals on floor 3."),
    ]
    scores = loaded.predict(inputs)
    assert np.allclose(scores, result.model.predict(inputs), atol=1e-5)


def test_worse_than_base_is_written_flagged_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus, qa = office_files(tmp_path, sites=6, topics=4, per_doc=1)
    out = tmp_path / "broken"
    args = ["--output-dir", str(out), "--qa-file", str(qa), "--corpus", str(corpus)]
    rc = main(["embed", *args, "--epochs", "3", "--patience", "1", "--learning-rate", "0.05"])
    assert rc == WORSE_THAN_BASE_EXIT == 3
    err = capsys.readouterr().err
    assert "WORSE than base" in err and "WORSE_THAN_BASE" in err
    m = assert_output_dir(out, learned=False)
    assert m["worse_than_base"] and not m["better_than_base"]
    assert m["trained"]["mrr@10"] < m["base"]["mrr@10"]
    # the best epoch is the one kept; with patience 1 the run ends one epoch after it
    vals = {h["epoch"]: h["val"] for h in m["history"] if "val" in h}
    assert vals[m["best_epoch"]] == m["trained"] and vals[0] == m["base"]
    assert all(vals[e]["mrr@10"] <= m["trained"]["mrr@10"] for e in vals if e)
    assert m["epochs_run"] == min(m["best_epoch"] + 1, 3)
    assert m["stopped_early"] == (m["epochs_run"] < 3)
    flag = (out / "WORSE_THAN_BASE").read_text()
    assert "WORSE" in flag and f"{m['base']['mrr@10']:.3f}" in flag


def test_chat_data_gives_pairs_and_trains(tmp_path: Path) -> None:
    docs, qa = office(sites=4, topics=4, per_doc=2)
    text = {d["id"]: d["text"] for d in docs}
    rows: list[Any] = [
        {
            "messages": [
                {"role": "system", "content": "You answer office questions."},
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": text[r["document_id"]]},
            ]
        }
        for r in qa
    ]
    rows[0]["messages"] += [  # a second exchange in one conversation
        {"role": "user", "content": "And on Sundays?"},
        {"role": "assistant", "content": "Closed on Sundays."},
    ]
    chat = write_jsonl(tmp_path / "chat.jsonl", rows)
    pairs, answers = chat_pairs(chat)
    assert len(pairs) == len(qa) + 1
    assert len(answers) == len(docs) + 1  # each distinct answer once
    assert pairs[1].query == "And on Sundays?" and pairs[1].positive == "Closed on Sundays."
    assert pairs[0].origin.endswith("chat.jsonl:1") and pairs[2].origin.endswith(":2")
    same = [p for p in pairs if p.positive == pairs[0].positive]
    assert len(same) == 2 and same[0].relevant == same[1].relevant
    out = tmp_path / "from-chat"
    cfg = EmbedConfig(output_dir=out, chat_file=chat, epochs=1, learning_rate=6e-5)
    m = train_embedder(cfg).metrics
    assert m["pairs_by_source"] == {"chat": len(qa) + 1}
    assert m["pool_passages"] == len(answers)
    assert m["trained"]["mrr@10"] >= m["base"]["mrr@10"], (m["base"], m["trained"])


# --- input errors ------------------------------------------------------------------------


def test_bad_lines_are_named_by_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus, _ = office_files(tmp_path, sites=2, topics=2, per_doc=1)
    qa = write_jsonl(
        tmp_path / "bad-qa.jsonl",
        [
            {"question": "Where do I leave my blorp at Velmora?", "document_id": "velmora-parking"},
            "{not json",
            {"question": "Where?"},
            "",
            {"question": "Who?", "document_id": "no-such-doc"},
            {"question": "Fee?", "answer": "this text is in no document"},
        ],
    )
    out = tmp_path / "never"
    rc = main(["embed", "--output-dir", str(out), "--qa-file", str(qa), "--corpus", str(corpus)])
    err = capsys.readouterr().err
    assert rc == 2
    for line, why in (
        (2, "not JSON"),
        (3, "give exactly one of"),
        (5, "no such document in the corpus: no-such-doc"),
        (6, "the answer is in no document"),
    ):
        assert f"bad-qa.jsonl:{line}: {why}" in err, err
    assert "bad-qa.jsonl:1:" not in err and "bad-qa.jsonl:4:" not in err
    assert not out.exists() and not (tmp_path / "never.partial").exists()

    bad_corpus = write_jsonl(
        tmp_path / "bad-corpus.jsonl",
        [{"id": "a", "text": "fine"}, {"id": "a", "text": "again"}, {"id": "b"}, "[]"],
    )
    rc = main(["rerank", "--output-dir", str(out), "--pseudo-queries", "--corpus", str(bad_corpus)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad-corpus.jsonl:2: duplicate id 'a' (first on line 1)" in err
    assert "bad-corpus.jsonl:3:" in err and "bad-corpus.jsonl:4: not a JSON object" in err

    chat = write_jsonl(
        tmp_path / "bad-chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            },
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "assistant", "content": "unprompted"}]},
        ],
    )
    with pytest.raises(DataError) as info:
        chat_pairs(chat)
    assert [p.split(": ", 1)[0] for p in info.value.problems] == [
        f"{chat}:2",
        f"{chat}:3",
    ]
    assert "no user turn followed by an assistant turn" in info.value.problems[1]
    # a missing data source is a flag error, before anything is read
    assert main(["embed", "--output-dir", str(out)]) == 2
    assert "--qa-file" in capsys.readouterr().err


def test_split_by_document_keeps_each_document_on_one_side() -> None:
    pairs = [
        Pair(f"q{i}", frozenset({f"d{i % 10}"} | ({"d0"} if i % 25 == 0 else set())), "p", "qa", "")
        for i in range(60)
    ]
    train, val = split_pairs(pairs, fraction=0.2, seed=3, by="document")
    assert len(train) + len(val) == 60 and 6 <= len(val) <= 18
    train_docs = {d for p in train for d in p.relevant}
    assert not train_docs & {d for p in val for d in p.relevant}
    assert split_pairs(pairs, fraction=0.2, seed=3, by="document") == (train, val)
    assert split_pairs(pairs, fraction=0.2, seed=4, by="document") != (train, val)
    train, val = split_pairs(pairs, fraction=0.2, seed=3, by="query")
    assert len(val) == 12 and len(train) == 48 and not set(train) & set(val)


def test_mined_negatives_avoid_positives_and_held_out_documents(tmp_path: Path) -> None:
    from trainers.retrieval_prep import encode, load_embedder, prepare, read_sources

    corpus, qa = office_files(tmp_path)
    cfg = EmbedConfig(output_dir=tmp_path / "x", qa_file=qa, corpus=corpus, hard_negatives=3)
    from rag_service.settings import bundled_embedding_model

    model = load_embedder(bundled_embedding_model(), 256)
    data = prepare(cfg, read_sources(cfg, None), model, None, False, fill=False)
    held_out = {d for p in data.val for d in p.relevant}
    assert not held_out & {d for p in data.train for d in p.relevant}
    assert len(data.pool) == 48 and all(p.positive for p in data.train)
    # every labelled positive is its document's (only) passage
    text = {p.document_id: p.text for p in data.pool}
    assert all(p.positive == text[min(p.relevant)] for p in data.train)
    q = encode(model, [p.query for p in data.train])
    mined = 0
    for i, (pair, negatives) in enumerate(zip(data.train, data.negatives, strict=True)):
        positive = float(q[i] @ data.pool_emb[[*text].index(min(pair.relevant))])
        for j in negatives:
            assert data.pool[j].document_id not in pair.relevant | held_out
            assert float(q[i] @ data.pool_emb[j]) <= 0.95 * positive + 1e-5
        mined += len(negatives)
    assert mined >= 2 * len(data.train)  # close to the 3 asked for
    assert data.counts["hard_negatives"]["skipped_above_margin"] > 0


# --- pseudo-queries ----------------------------------------------------------------------

MARKDOWN = """# Travel policy

Trips over three days need the approval of a director before anything is booked.

## Booking flights

Flights are booked through the travel desk, economy class for trips under six hours.

```
# this is a comment in a code block, not a heading
```

Hotel nights
------------

Hotels are paid up to 180 euros a night in capital cities, 120 elsewhere.

## Overview

This overview section appears in two documents, so it says nothing about which is meant.
"""

REST = """=============
Security desk
=============

The security desk issues visitor badges and keeps lost property for thirty days.

Lost badges
~~~~~~~~~~~

A lost badge is blocked at once; a new one costs fifteen euros from the second loss on.

Overview
========

This overview section appears in two documents, so it says nothing about which is meant.
"""


def test_pseudo_queries_from_headings_and_titles() -> None:
    from tokenizers import Tokenizer

    from rag_service.settings import bundled_embedding_model

    assert [s.title for s in sections(MARKDOWN)] == [
        "Travel policy",
        "Booking flights",
        "Hotel nights",
        "Overview",
    ]
    assert [s.title for s in sections(REST)] == ["Security desk", "Lost badges", "Overview"]
    flights = sections(MARKDOWN)[1].body
    assert flights.startswith("Flights are booked") and "# this is a comment" in flights
    corpus = [
        Document("travel", MARKDOWN),
        Document("security", REST),
        Document("kitchen", "Dishes go in the machine before 17:00.", {"title": "Kitchen rules"}),
        Document("short", "# Tiny\n\nToo short.\n"),
    ]
    pairs, ambiguous = heading_pairs(corpus)
    got = {(p.query, min(p.relevant), p.source) for p in pairs}
    assert got == {
        ("Travel policy", "travel", "heading"),
        ("Booking flights", "travel", "heading"),
        ("Hotel nights", "travel", "heading"),
        ("Security desk", "security", "heading"),
        ("Lost badges", "security", "heading"),
        ("Kitchen rules", "kitchen", "title"),
    }
    assert ambiguous == 1  # "Overview", in two documents
    lost = next(p for p in pairs if p.query == "Lost badges")
    assert lost.positive is not None and lost.positive.startswith("A lost badge is blocked")
    assert "Lost badges" not in (lost.positive or "")
    # The passages searched at validation lose their headings, so a heading cannot find its
    # section by its own words.
    stripped = strip_headings(REST)
    assert "Security desk" not in stripped and "~~~" not in stripped and "===" not in stripped
    assert "keeps lost property" in stripped
    tok = Tokenizer.from_file(str(Path(bundled_embedding_model()) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()

    def offsets(texts: list[str]) -> list[list[tuple[int, int]]]:
        return [list(e.offsets) for e in tok.encode_batch(texts, add_special_tokens=False)]

    passages = chunk_documents(corpus, offsets, chunk_tokens=200, overlap=40, headings=False)
    assert not any("Booking flights" in p.text or "Lost badges" in p.text for p in passages)
    kept = chunk_documents(corpus, offsets, chunk_tokens=200, overlap=40)
    assert any("Booking flights" in p.text for p in kept)


# --- from a running service ----------------------------------------------------------------


def test_collection_and_question_writer_through_the_service(
    make_client: Any, fake_upstream: Any, tmp_path: Path
) -> None:
    client = make_client()
    docs, _ = office(sites=1, topics=3, per_doc=1)
    docs[0]["metadata"] = {"title": "Parking"}
    resp = client.post("/v1/collections/office/documents", json={"documents": docs})
    assert resp.status_code == 200, resp.text
    got = fetch_collection(client, "office", page_size=2)  # two pages
    assert sorted(d.id for d in got) == sorted(d["id"] for d in docs)
    assert {d.id: d.text for d in got} == {d["id"]: d["text"] for d in docs}
    assert next(d for d in got if d.id == docs[0]["id"]).metadata == {"title": "Parking"}
    with pytest.raises(DataError, match=r"'nowhere'.*404"):
        fetch_collection(client, "nowhere")

    from trainers.retrieval_data import Passage

    parking = [Passage(docs[0]["id"], docs[0]["text"])]
    fake_upstream.reply = "Question: Where can I leave a blorp overnight?"
    pairs, refused = write_questions(client, parking, model=None)
    assert [(p.query, p.source, p.relevant) for p in pairs] == [
        ("Where can I leave a blorp overnight?", "generated", frozenset({docs[0]["id"]}))
    ]
    sent = fake_upstream.requests[-1]
    assert len(sent["messages"]) == 1 and docs[0]["text"] in sent["messages"][0]["content"]
    assert "Source" not in json.dumps(sent)  # retrieval was off: nothing was added
    both = [*parking, Passage(docs[1]["id"], docs[1]["text"])]
    pairs, refused = write_questions(client, both, model=None)  # one question for two
    assert pairs == [] and refused == {"asked of several documents": 2}
    fake_upstream.reply = "Paris is the capital of France [1]."
    pairs, refused = write_questions(client, parking, model=None)
    assert pairs == [] and refused == {"not a question (no question mark)": 1}
    # The trainer reads the collection and asks the writer itself; one reply for every passage
    # names no single document, so nothing is left to train on: an error, and nothing written.
    fake_upstream.reply = "Where can I leave a blorp overnight?"
    out = tmp_path / "never"
    cfg = EmbedConfig(output_dir=out, collection="office", question_writer="default")
    with pytest.raises(DataError, match=r"no training pairs.*asked of several documents"):
        train_embedder(cfg, client=client)
    assert len(fake_upstream.requests) == 4 + len(docs)
    assert not out.exists() and not out.with_name("never.partial").exists()


def test_question_checks() -> None:
    passage = "Cars go in the north garage, level B3. Book a space in the app."
    assert check_question("1. What floor is the garage on?", passage) == (
        "What floor is the garage on?",
        "",
    )
    assert check_question("Book a space in the app?", passage)[1] == "copied from the passage"
    assert check_question("Garage?", passage)[1] == "too short (under 3 words)"
    assert check_question("Where?\nAnd when?", passage)[1] == "more than one line"
    assert check_question("  ", passage)[1] == "empty reply"


@pytest.mark.parametrize("command, config", [("embed", EmbedConfig), ("rerank", RerankConfig)])
def test_help_names_every_option(
    command: str, config: type, capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(config):
        assert "--" + f.name.replace("_", "-") in out
