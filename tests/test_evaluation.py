"""Retrieval evaluation: the metric code checked by hand, the endpoint, and the CLI."""

from __future__ import annotations

import json
import math

import pytest

from rag_service.cli import main
from rag_service.evaluation import (
    documents_in_order,
    match_answers,
    median,
    ndcg_at,
    normalise,
    recall_at,
    reciprocal_rank_at,
    score_rankings,
)
from rag_service.settings import Settings
from tests.support import error_of, free_port, running_server

DOCS = [
    {"id": "leave", "text": "Employees get 30 days of paid leave per year."},
    {"id": "parking", "text": "Parking is free in garage B for all staff."},
    {"id": "vpn", "text": "Connect to the VPN with the corporate client before opening mail."},
    {"id": "lunch", "text": "Lunch is served at noon in the canteen; parking is free."},
]
# Questions each answered by exactly one document, worded close to it.
EASY = [
    {"question": "How many days of paid leave do employees get?", "document_id": "leave"},
    {"question": "How do I connect to the VPN?", "document_id": "vpn"},
    {"question": "When is lunch served in the canteen?", "document_ids": ["lunch"]},
]


# ---- metrics, by hand ----------------------------------------------------------------------
def test_metrics_on_a_hand_checked_set():
    rankings = [
        ["a", "b", "c"],  # q1: relevant "a" at rank 1
        ["x", "y", "z", "b"],  # q2: relevant "b" at rank 4
        ["x", "y", "z", "w", "v", "u", "t", "s", "r", "q", "b"],  # q3: "b" at rank 11
    ]
    relevant = [{"a"}, {"b"}, {"b"}]
    s = score_rankings(rankings, relevant)
    assert s.questions == 3
    # recall@1: only q1 -> 1/3; recall@5: q1, q2 -> 2/3; recall@10: q3's rank 11 is out -> 2/3
    assert s.recall_at_1 == pytest.approx(1 / 3)
    assert s.recall_at_5 == pytest.approx(2 / 3)
    assert s.recall_at_10 == pytest.approx(2 / 3)
    # MRR@10: (1/1 + 1/4 + 0) / 3 = 1.25 / 3
    assert s.mrr_at_10 == pytest.approx(1.25 / 3)
    # nDCG@10 (one relevant each, ideal DCG = 1): q1 1, q2 1/log2(5), q3 0
    assert s.ndcg_at_10 == pytest.approx((1 + 1 / math.log2(5)) / 3)


def test_multi_relevant_rows():
    ranking = ["x", "a", "y", "b"]
    relevant = {"a", "b", "c"}
    # Found as soon as any relevant document is in the top k.
    assert recall_at(ranking, relevant, 1) == 0.0
    assert recall_at(ranking, relevant, 2) == 1.0
    assert reciprocal_rank_at(ranking, relevant) == 0.5
    # DCG = 1/log2(3) + 1/log2(5); ideal (3 relevant) = 1 + 1/log2(3) + 1/log2(4)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    ideal = 1 + 1 / math.log2(3) + 0.5
    assert ndcg_at(ranking, relevant) == pytest.approx(dcg / ideal)
    # The ideal DCG counts at most 10 relevant documents.
    many = {f"d{i}" for i in range(20)}
    assert ndcg_at([f"d{i}" for i in range(10)], many) == pytest.approx(1.0)
    assert ndcg_at(ranking, set()) == 0.0


def test_edges_dedupe_and_matching():
    assert score_rankings([], []).recall_at_1 == 0.0
    with pytest.raises(ValueError):
        score_rankings([["a"]], [])
    # Chunk hits ranked by document, each at its best chunk.
    assert documents_in_order(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([]) == 0.0
    assert normalise("  Paid\n\tLEAVE  ﬁle ") == "paid leave file"
    found = match_answers(
        {0: "30 DAYS of  paid\nleave", 1: "parking is free", 2: "nothing like this", 3: " "},
        [(d["id"], d["text"]) for d in DOCS],
    )
    assert found == {0: ["leave"], 1: ["parking", "lunch"], 2: [], 3: []}


# ---- the endpoint --------------------------------------------------------------------------
@pytest.fixture
def kb(make_client):
    client = make_client()
    resp = client.post("/v1/collections/kb/documents", json={"documents": DOCS})
    assert resp.status_code == 200, resp.text
    return client


def test_endpoint_perfect_on_easy_questions(kb):
    resp = kb.post("/v1/collections/kb/evaluate", json={"rows": EASY})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "evaluation"
    assert body["collection"] == "kb" and body["rows"] == 3 and body["evaluated"] == 3
    assert body["unmatched"] == []
    assert set(body["modes"]) == {"dense", "hybrid"}
    for figures in body["modes"].values():
        for key in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"):
            assert figures[key] == 1.0, (key, figures)
        assert figures["latency_p50_ms"] > 0

    one = kb.post("/v1/collections/kb/evaluate", json={"rows": EASY, "modes": ["dense"]})
    assert set(one.json()["modes"]) == {"dense"}


def test_endpoint_answers_and_unmatched(kb):
    rows = [
        {"question": "How many days of paid leave?", "answer": "30 days of PAID\n leave"},
        {"question": "Is parking free?", "answer": "parking is free"},  # two documents
        {"question": "What is the wifi password?", "answer": "hunter2"},  # none
        {"question": "Where is the printer?", "document_ids": ["printer", "fax"]},  # unknown
        {"question": "How do I connect to the VPN?", "document_ids": ["vpn", "gone"]},
    ]
    resp = kb.post("/v1/collections/kb/evaluate", json={"rows": rows, "modes": ["dense"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["rows"] == 5 and body["evaluated"] == 2
    assert body["unmatched"] == [
        {"row": 1, "reason": "ambiguous", "documents": ["lunch", "parking"]},
        {"row": 2, "reason": "no_match", "documents": []},
        {"row": 3, "reason": "unknown_document", "documents": ["printer", "fax"]},
    ]
    # The two usable rows (answer matched to "leave"; "vpn" of vpn/gone) are found first.
    assert body["modes"]["dense"]["recall@1"] == 1.0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rows": []}, "rows"),
        ({"rows": [{"question": "q", "document_id": "leave"}, {"question": "q"}]}, "rows[1]"),
        (
            {"rows": [{"question": "q", "document_id": "leave", "answer": "30 days"}]},
            "rows[0].answer",
        ),
        ({"rows": [{"question": "q", "document_id": "a//b"}]}, "rows[0].document_id"),
        ({"rows": [{"question": " ", "document_id": "leave"}]}, "rows[0].question"),
        ({"rows": [{"question": "q", "document_ids": []}]}, "rows[0].document_ids"),
        ({"rows": [{"question": "q", "document_id": "leave", "x": 1}]}, "rows[0]"),
        ({"rows": [{"question": "q", "document_id": "leave"}], "modes": ["rerank"]}, "modes"),
        ({"rows": [{"question": "q", "document_id": "leave"}] * 2001}, "rows"),
    ],
)
def test_bad_input_names_the_field(kb, body, param):
    resp = kb.post("/v1/collections/kb/evaluate", json=body)
    assert resp.status_code == 400, resp.text
    error = error_of(resp)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error


def test_question_longer_than_the_setting_and_missing_collection(make_client):
    client = make_client(max_query_chars=20)
    rows = [{"question": "q", "document_id": "a"}, {"question": "q" * 21, "document_id": "a"}]
    resp = client.post("/v1/collections/kb/evaluate", json={"rows": rows})
    assert resp.status_code == 400
    assert error_of(resp)["param"] == "rows[1].question"
    resp = client.post("/v1/collections/kb/evaluate", json={"rows": rows[:1]})
    assert resp.status_code == 404


# ---- the CLI -------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path, embedder, fake_server):
    settings = Settings(
        data_dir=tmp_path / "data", port=free_port(), api_key="k", upstream_url=fake_server.url
    )
    with running_server(settings, embedder) as url:
        import httpx

        httpx.post(
            f"{url}/v1/collections/kb/documents",
            json={"documents": DOCS},
            headers={"Authorization": "Bearer k"},
            timeout=60,
        ).raise_for_status()
        yield url


def _write(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_cli_eval_table_json_and_gate(server, tmp_path, capsys):
    common = ["--url", server, "--api-key", "k", "--collection", "kb"]
    qa = _write(
        tmp_path / "qa.jsonl",
        [*EASY, "", {"question": "Is parking free?", "answer": "parking is free", "id": 7}],
    )
    assert main(["eval", str(qa), *common]) == 0
    captured = capsys.readouterr()
    assert "3 of 4 questions evaluated" in captured.out
    table = {line.split()[0]: line.split()[1:] for line in captured.out.splitlines()[2:]}
    assert set(table) == {"dense", "hybrid"}
    assert table["dense"][:5] == ["1.000"] * 5
    # The ambiguous row is reported by its line (line 4 is blank).
    assert f"{qa}:5: left out, the answer is in several documents" in captured.err

    assert main(["eval", str(qa), *common, "--json", "--modes", "dense"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["modes"]) == {"dense"} and data["modes"]["dense"]["recall@1"] == 1.0
    assert data["unmatched"][0]["line"] == 5 and data["unmatched"][0]["reason"] == "ambiguous"

    # A gate it meets, and one it cannot: a question whose document is not the best hit.
    assert main(["eval", str(qa), *common, "--min-recall-at-1", "1.0"]) == 0
    capsys.readouterr()
    hard = _write(
        tmp_path / "hard.jsonl",
        [
            *EASY,
            {"question": "How many days of paid leave do employees get?", "document_id": "vpn"},
        ],
    )
    assert main(["eval", str(hard), *common, "--modes", "dense", "--min-recall-at-1", "0.9"]) == 1
    assert "recall@1 below 0.9: dense 0.750" in capsys.readouterr().err
    assert main(["eval", str(hard), *common, "--modes", "dense", "--min-recall-at-1", "0.7"]) == 0


def test_cli_eval_bad_lines_exit_2_without_calling(tmp_path, capsys):
    # No server at this URL: a bad file must be refused before any request.
    url = f"http://127.0.0.1:{free_port()}"
    bad = _write(
        tmp_path / "bad.jsonl",
        [
            EASY[0],
            "not json",
            {"document_id": "leave"},
            {"question": "q", "document_id": "leave", "answer": "x"},
            {"question": "q", "document_ids": []},
            [1, 2],
        ],
    )
    assert main(["eval", str(bad), "--url", url]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not JSON" in err
    assert f'{bad}:3: "question" must be a non-blank string' in err
    assert f"{bad}:4: give exactly one of" in err
    assert f'{bad}:5: "document_ids" must be a non-empty list of strings' in err
    assert f"{bad}:6: not a JSON object" in err
    assert f"{bad}:1:" not in err
    assert "cannot reach" not in err
    assert main(["eval", str(tmp_path / "missing.jsonl"), "--url", url]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["eval", str(_write(tmp_path / "ok.jsonl", EASY)), "--url", url]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert main(["eval", str(bad), "--url", url, "--modes", "sparse"]) == 2


def test_cli_eval_service_errors(server, tmp_path, capsys):
    qa = _write(tmp_path / "qa.jsonl", EASY)
    assert main(["eval", str(qa), "--url", server, "--api-key", "wrong", "-c", "kb"]) == 1
    assert "401" in capsys.readouterr().err
    assert main(["eval", str(qa), "--url", server, "--api-key", "k", "-c", "nope"]) == 1
    assert "eval failed (404)" in capsys.readouterr().err
