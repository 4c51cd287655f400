from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from rag_service.cli import main
from rag_service.settings import Settings
from tests.support import ROOT, free_port, running_server


@pytest.fixture
def server(tmp_path, embedder, fake_server):
    settings = Settings(
        data_dir=tmp_path / "data", port=free_port(), api_key="k", upstream_url=fake_server.url
    )
    with running_server(settings, embedder) as url:
        yield url


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "handbook"
    (root / "guides").mkdir(parents=True)
    (root / "guides" / "vpn.md").write_text("# VPN\nConnect to the VPN with the corp client.")
    (root / "leave.txt").write_text("Employees get 30 days of paid leave per year.")
    (root / "api.rst").write_text("API\n===\nThe API rate limit is 100 requests per minute.")
    (root / "office.html").write_text(
        "<html><head><style>p{}</style><script>var x=1;</script></head>"
        "<body><h1>Office</h1><p>The office opens at 8am.</p></body></html>"
    )
    (root / "faq.jsonl").write_text(
        json.dumps(
            {
                "id": "faq-parking",
                "text": "Parking is free in garage B.",
                "metadata": {"kind": "faq"},
            }
        )
        + "\n\n"
        + json.dumps({"text": "Lunch is served at noon."})
        + "\n"
    )
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


def run(*args):
    return main(list(args))


def test_ingest_reingest_update_and_search(server, tree, capsys):
    common = ["--url", server, "--api-key", "k", "--collection", "hb"]
    assert run("ingest", str(tree), *common, "--no-progress") == 0
    assert run("ingest", str(tree), *common, "--no-progress") == 0
    out = capsys.readouterr().out
    assert "0 created, 0 updated, 6 unchanged" in out

    (tree / "leave.txt").write_text("Employees get 32 days of paid leave per year.")
    assert run("ingest", str(tree), *common, "--no-progress") == 0
    assert "0 created, 1 updated, 5 unchanged" in capsys.readouterr().out

    assert run("search", "how many vacation days", *common, "--json") == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert results[0]["document_id"] == "handbook/leave.txt"
    assert "32 days" in results[0]["text"]
    assert results[0]["metadata"] == {
        "source": "handbook/leave.txt",
        "content_type": "text/plain",
        "folder": str(tree.resolve()),
    }

    assert run("search", "where can I park", *common) == 0
    assert "faq-parking" in capsys.readouterr().out.splitlines()[0]
    assert run("search", "office hours", *common, "-k", "1", "--json") == 0
    hit = json.loads(capsys.readouterr().out)["results"][0]
    assert hit["document_id"] == "handbook/office.html"
    assert "var x" not in hit["text"] and "8am" in hit["text"]


def test_ingest_pdf_and_word_then_sync_and_dry_run(server, tmp_path, capsys):
    """PDF and Word files ingest with their pages; --dry-run lists and changes nothing;
    --sync deletes the documents of vanished files (not of a file that fails to load)."""
    import httpx

    from tests.files import make_docx, make_pdf

    root = tmp_path / "manuals"
    root.mkdir()
    (root / "pump.pdf").write_bytes(
        make_pdf(["Pump manual. Prime the pump before use.", "Replace the seal every year."])
    )
    (root / "valve.docx").write_bytes(
        make_docx([("Heading 1", "Valves"), ("Normal", "Close the valve clockwise.")])
    )
    (root / "notes.md").write_text("# Notes\nCheck the pressure gauge daily.")
    (root / "old.txt").write_text("The old boiler was removed in 2020.")
    common = ["--url", server, "--api-key", "k", "--collection", "m"]
    assert run("ingest", str(root), *common) == 0
    captured = capsys.readouterr()
    assert "4 files: 4 created" in captured.out
    assert "stored 4/4 files" in captured.err  # not a terminal: plain progress lines

    assert run("search", "how often is the seal replaced", *common, "-k", "1", "--json") == 0
    hit = json.loads(capsys.readouterr().out)["results"][0]
    assert hit["document_id"] == "manuals/pump.pdf" and hit["page"] in (1, 2)
    assert hit["metadata"]["pages"] == 2

    (root / "old.txt").unlink()
    (root / "notes.md").write_text("# Notes\nCheck the pressure gauge twice a day.")
    (root / "pump.pdf").write_bytes(b"%PDF-1.4 truncated")  # fails to load: kept by --sync
    assert run("ingest", str(root), *common, "--sync", "--dry-run") == 1  # one file skipped
    out = capsys.readouterr().out
    assert "update  manuals/notes.md" in out and "delete  manuals/old.txt" in out
    assert "pump.pdf" not in out and "valve.docx" not in out
    assert "1 to update, 1 unchanged, 1 to delete" in out
    auth = {"Authorization": "Bearer k"}
    listed = httpx.get(f"{server}/v1/collections/m/documents", headers=auth).json()["data"]
    assert len(listed) == 4  # the dry run changed nothing

    assert run("ingest", str(root), *common, "--sync", "--no-progress") == 1
    captured = capsys.readouterr()
    assert "0 created, 1 updated, 1 unchanged" in captured.out
    assert captured.out.rstrip().endswith("chunks, 1 deleted, 1 skipped")
    assert "pump.pdf" in captured.err
    listed = httpx.get(f"{server}/v1/collections/m/documents", headers=auth).json()["data"]
    assert [d["id"] for d in listed] == [
        "manuals/notes.md",
        "manuals/pump.pdf",
        "manuals/valve.docx",
    ]
    assert run("ingest", str(root / "valve.docx"), *common, "--sync") == 2
    assert "--sync applies to folders" in capsys.readouterr().err


def test_search_leaves_the_mode_to_the_collection(server, tree, capsys):
    """Without --mode the collection's search defaults apply; --mode overrides them."""
    import httpx

    common = ["--url", server, "--api-key", "k", "--collection", "hb"]
    assert run("ingest", str(tree), *common, "--no-progress") == 0
    auth = {"Authorization": "Bearer k"}
    resp = httpx.patch(
        f"{server}/v1/collections/hb", json={"search": {"mode": "hybrid"}}, headers=auth
    )
    assert resp.status_code == 200, resp.text
    query = "paid leave days"

    def scores(mode):
        body = {"query": query, "top_k": 5, "mode": mode}
        resp = httpx.post(f"{server}/v1/collections/hb/search", json=body, headers=auth)
        return [(h["chunk_id"], h["score"]) for h in resp.json()["results"]]

    def cli(*flags):
        capsys.readouterr()
        assert run("search", query, *common, "--json", *flags) == 0
        return [(h["chunk_id"], h["score"]) for h in json.loads(capsys.readouterr().out)["results"]]

    assert scores("hybrid") != scores("dense")
    assert cli() == scores("hybrid")
    assert cli("--mode", "dense") == scores("dense")


def test_cli_errors(server, tree, tmp_path, capsys):
    assert run("ingest", str(tmp_path / "missing"), "--url", server, "--api-key", "k") == 2
    assert "no such file" in capsys.readouterr().err
    assert run("search", "x", "--url", server, "--api-key", "wrong") == 1
    assert "401" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    assert run("ingest", str(bad), "--url", server, "--api-key", "k", "--no-progress") == 1
    assert "bad.jsonl:2: not JSON" in capsys.readouterr().err
    port = free_port()
    assert run("search", "x", "--url", f"http://127.0.0.1:{port}") == 1
    assert "cannot reach" in capsys.readouterr().err


def test_ingest_never_reports_work_it_could_not_store(tmp_path, capsys):
    """A server that cannot be reached: exit 1, no success line, and the bar (as text) never
    counts a file as done."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(5):
        (docs / f"{i}.md").write_text(f"Note {i}: the printer on floor {i} needs toner.")
    port = free_port()
    assert run("ingest", str(docs), "--url", f"http://127.0.0.1:{port}", "--collection", "x") == 1
    captured = capsys.readouterr()
    assert "cannot reach" in captured.err
    assert "stopped after 0 of 5 files" in captured.err
    assert "5/5" not in captured.err and "100%" not in captured.err
    assert "created" not in captured.out


def test_ingest_sends_large_folders_in_several_batches(server, tmp_path, capsys):
    """Batches close at --batch-size documents or about 100k characters, so progress moves."""
    from rag_service.cli.ingest import BATCH_CHARS

    docs = tmp_path / "big"
    docs.mkdir()
    words = "Invoices are approved by the finance team within five working days. "
    for i in range(3):  # each file over half a batch: three requests
        (docs / f"{i}.txt").write_text(
            f"Section {i}. " + words * (BATCH_CHARS // len(words) // 2 + 10)
        )
    common = ["--url", server, "--api-key", "k", "--collection", "big", "--no-progress"]
    assert run("ingest", str(docs), *common) == 0
    out = capsys.readouterr().out
    assert "3 files: 3 created, 0 updated, 0 unchanged" in out
    import httpx

    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": "Bearer k"}).text
    line = next(
        m
        for m in metrics.splitlines()
        if m.startswith("rag_http_request_duration_seconds_count")
        and 'method="POST"' in m
        and "/documents" in m
    )
    assert float(line.rsplit(" ", 1)[1]) >= 2  # not one request for all of it


def test_serve_help_names_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "rag_service", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for f in dataclasses.fields(Settings):
        assert "--" + f.name.replace("_", "-") in out
        assert "RAG_" + f.name.upper() in out


def test_serve_rejects_bad_setting():
    proc = subprocess.run(
        [sys.executable, "-m", "rag_service", "serve", "--port", "abc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "RAG_PORT: expected int" in proc.stderr


def test_serve_on_a_taken_port_exits_at_once(tmp_path):
    """No model is loaded and nothing is logged after the refusal."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "rag_service", "serve", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAG_DATA_DIR": str(tmp_path / "data")},
        )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "in use" in proc.stderr
    assert "Loading" not in proc.stderr and "embedding" not in proc.stderr.lower()
    assert not (tmp_path / "data").exists()  # the store was never opened


def test_serve_logging_writes_from_a_listener_thread(capsys):
    import logging
    import threading

    from rag_service.logs import start_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    threads: list[str] = []

    class Marker:  # formatted lazily: shows which thread did the formatting
        def __str__(self) -> str:
            threads.append(threading.current_thread().name)
            return "marker"

    try:
        listener = start_logging("info")
        logging.getLogger("rag_service.test.access").info('%s - "GET /" %d', "1.2.3.4", 200)
        logging.getLogger("rag_service.test").info("value %s", Marker())
        logging.getLogger("rag_service.test").debug("not shown")
        logging.getLogger("httpx").info("upstream request line, not shown")
        listener.stop()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith('INFO rag_service.test.access: 1.2.3.4 - "GET /" 200')
    assert err[1].endswith("INFO rag_service.test: value marker")
    assert len(err) == 2
    assert threads and threads[0] != threading.current_thread().name


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, "http://127.0.0.1:8000"),
        ({"RAG_PORT": "9001"}, "http://127.0.0.1:9001"),
        ({"RAG_HOST": "0.0.0.0", "RAG_PORT": "9002"}, "http://127.0.0.1:9002"),
        ({"RAG_HOST": "10.1.2.3"}, "http://10.1.2.3:8000"),
        ({"RAG_HOST": "::1", "RAG_PORT": "7"}, "http://[::1]:7"),
        ({"RAG_URL": "https://rag.example/", "RAG_PORT": "9"}, "https://rag.example/"),
    ],
)
def test_client_commands_find_the_server_from_its_settings(env, url):
    from rag_service.cli.client import default_url

    assert default_url(env) == url


def test_sync_is_keyed_by_the_whole_folder(server, tmp_path, capsys):
    """Two folders named kb: the second may not take the first one's ids (it used to
    overwrite them), and --sync of one never deletes the other's documents (it deleted
    kb/leave.md, which came from a/kb). Documents that record no folder are kept."""
    import shutil

    import httpx

    auth = {"Authorization": "Bearer k"}
    common = ["--url", server, "--api-key", "k", "--collection", "c", "--no-progress"]
    a, b = tmp_path / "a" / "kb", tmp_path / "b" / "kb"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    (a / "leave.md").write_text("Leave is 30 days a year.")
    (a / "shared.md").write_text("The shared note of folder a.")
    (b / "shared.md").write_text("The shared note of folder b.")

    def stored() -> dict[str, dict]:
        page = httpx.get(f"{server}/v1/collections/c/documents", headers=auth).json()
        return {d["id"]: d for d in page["data"]}

    assert run("ingest", str(a), *common) == 0
    assert stored()["kb/leave.md"]["metadata"]["folder"] == str(a.resolve())
    capsys.readouterr()
    assert run("ingest", str(b), *common, "--sync") == 2
    err = capsys.readouterr().err
    assert "--prefix" in err and str(a.resolve()) in err and "nothing was changed" in err
    assert set(stored()) == {"kb/leave.md", "kb/shared.md"}
    doc = httpx.get(f"{server}/v1/collections/c/documents/kb/shared.md", headers=auth).json()
    assert doc["text"] == "The shared note of folder a."

    assert run("ingest", str(b), *common, "--prefix", "kb-b", "--sync") == 0
    assert set(stored()) == {"kb/leave.md", "kb/shared.md", "kb-b/shared.md"}

    httpx.post(  # a document from before folders were recorded
        f"{server}/v1/collections/c/documents",
        json={"documents": [{"id": "kb/legacy.md", "text": "From an older ingest."}]},
        headers=auth,
    ).raise_for_status()
    (a / "leave.md").unlink()
    capsys.readouterr()
    assert run("ingest", str(a), *common, "--sync") == 0
    captured = capsys.readouterr()
    assert "1 deleted" in captured.out
    assert "kept 1 documents under 'kb/' that record no folder" in captured.err
    assert set(stored()) == {"kb/shared.md", "kb/legacy.md", "kb-b/shared.md"}

    moved = tmp_path / "moved" / "kb"
    shutil.copytree(a, moved)
    assert run("ingest", str(moved), *common, "--sync") == 2  # another folder, same ids
    assert run("ingest", str(moved), *common, "--source", str(a.resolve()), "--sync") == 0
    assert set(stored()) == {"kb/shared.md", "kb/legacy.md", "kb-b/shared.md"}


def test_check_ids_lists_stored_ids_that_break_the_rule(tmp_path, embedder, fake_server, capsys):
    """Documents stored before the id rule keep their ids; check-ids names them and changes
    nothing, and each can still be read and deleted with its dots percent-encoded."""
    import httpx
    from litestar.testing import TestClient

    from rag_service.app import create_app
    from rag_service.schemas import DocumentIn
    from tests.support import BASE_URL, wait_ready

    settings = Settings(data_dir=tmp_path / "data", port=free_port(), upstream_url=fake_server.url)
    legacy = ["dots/../victim", "nl\n", "fine/id"]
    with TestClient(create_app(settings, embedder=embedder), base_url=BASE_URL) as planting:
        wait_ready(planting)
        kb = planting.app.state["kb"]  # as an older version stored them: no id rule
        docs = [DocumentIn(id=i, text=f"text of {i!r}") for i in legacy]
        planting.blocking_portal.call(kb.upsert, "old", docs)
    with running_server(settings, embedder) as url:
        assert run("check-ids", "--url", url) == 1
        captured = capsys.readouterr()
        lines = captured.out.splitlines()
        assert lines == [
            "old\t'dots/../victim'\tit holds a '.' or '..' segment (clients resolve those in "
            "URL paths)",
            "old\t'nl\\n'\tit holds a control character (U+000A)",
        ], lines
        assert "2 document ids break the id rule" in captured.err
        assert run("check-ids", "--url", url, "--collection", "old") == 1
        encoded = f"{url}/v1/collections/old/documents/dots/%2E%2E/victim"
        assert httpx.get(encoded).json()["id"] == "dots/../victim"
        assert httpx.delete(encoded).status_code == 204
        httpx.delete(f"{url}/v1/collections/old/documents/nl%0A").raise_for_status()
        capsys.readouterr()
        assert run("check-ids", "--url", url) == 0
        assert "every document id follows the rule" in capsys.readouterr().err
