"""POST /v1/collections/{name}/files: real PDF, Word, Markdown and HTML files through the app,
pages and sections in search results and chat sources, and every way an upload can be bad."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.files import make_docx, make_encrypted_pdf, make_pdf, make_scanned_pdf
from tests.support import ENGINES, engine_database_url, error_of


def _page(topic: str, sentence: str) -> str:
    # About 300 tokens: chunks (200 tokens) in the middle of a page lie inside it.
    filler = [f"{topic} note {i}: {sentence}" for i in range(12)]
    return "\n".join([f"{topic}.", *filler])


PAGES = [
    _page("Welcome", "the handbook covers the rules every member of staff follows at work."),
    _page("Travel", "book flights through the travel desk at least two weeks ahead of time."),
    _page("Parking", "staff park for free in garage B, level minus two, with their badge."),
]
GUIDE = (
    "# Setup guide\n\nThis guide sets up a workstation.\n\n"
    "## Printers\n\nAdd the office printer named lobby-laser from the print dialog.\n\n"
    "## Email\n\nUse the mail client with the server mail.example.org on port 993.\n"
)
PAGE_HTML = (
    "<html><head><title>Cafeteria</title><script>track()</script></head><body>"
    "<nav>Home | About | Contact</nav><main><h1>Cafeteria</h1>"
    "<p>The cafeteria serves lunch from noon to two.</p></main>"
    "<footer>Copyright 2026</footer></body></html>"
)


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str | None:
    """The embedded engine, or both for the tests parametrized over :data:`ENGINES`."""
    return engine_database_url(request) if hasattr(request, "param") else None


def upload(client: Any, files: list[tuple[str, bytes]], collection: str = "kb", **form: Any) -> Any:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return client.post(f"/v1/collections/{collection}/files", files=parts, data=form)


def search(client: Any, query: str, collection: str = "kb", **kw: Any) -> list[dict[str, Any]]:
    resp = client.post(f"/v1/collections/{collection}/search", json={"query": query, **kw})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["results"])


@pytest.mark.parametrize("database_url", ENGINES, indirect=True)
def test_files_become_documents_with_pages_and_sections(client: Any) -> None:
    files = [
        ("handbook.pdf", make_pdf(PAGES, title="Staff handbook")),
        ("guide.md", GUIDE.encode()),
        (
            "policy.docx",
            make_docx([("Title", "Remote work"), ("Normal", "Work from home on Fridays.")]),
        ),
        ("cafeteria.html", PAGE_HTML.encode()),
    ]
    resp = upload(client, files, metadata=json.dumps({"team": "hr"}))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "upload" and body["collection"] == "kb"
    by_name = {f["filename"]: f for f in body["files"]}
    assert [f["status"] for f in body["files"]] == ["stored"] * 4
    pdf = by_name["handbook.pdf"]
    assert pdf["content_type"] == "application/pdf" and pdf["pages"] == 3
    assert pdf["title"] == "Staff handbook"
    assert pdf["documents"][0]["id"] == "handbook.pdf"
    assert pdf["documents"][0]["status"] == "created"
    assert by_name["policy.docx"]["title"] == "Remote work"

    doc = client.get("/v1/collections/kb/documents/handbook.pdf").json()
    meta = doc["metadata"]
    assert meta["pages"] == 3 and meta["filename"] == "handbook.pdf" and meta["team"] == "hr"
    assert len(meta["page_starts"]) == 3
    assert doc["text"][meta["page_starts"][2] :].startswith("Parking")

    [top] = search(client, "where do staff park their car", top_k=1)
    assert top["document_id"] == "handbook.pdf" and "garage B" in top["text"]
    assert top["page"] == 3 and "page_end" not in top
    assert "page_starts" not in top["metadata"] and top["metadata"]["title"] == "Staff handbook"
    [md] = search(client, "printer lobby-laser", top_k=1, filter={"filename": "guide.md"})
    assert md["section"] in ("Setup guide", "Printers")
    assert "sections" not in md["metadata"]
    [html] = search(client, "when is lunch served", top_k=1, filter={"filename": "cafeteria.html"})
    assert "Copyright" not in html["text"] and "Home | About" not in html["text"]
    assert html["metadata"]["title"] == "Cafeteria"

    # The same files again: unchanged; ids sent along name the documents instead.
    again = upload(client, files[:1], metadata=json.dumps({"team": "hr"}))
    assert again.json()["files"][0]["documents"][0]["status"] == "unchanged"
    moved = upload(client, files[:1], metadata=json.dumps({"team": "ops"}))
    assert moved.json()["files"][0]["documents"][0]["status"] == "updated"  # metadata only
    named = upload(client, files[1:2], id="guides/setup").json()["files"][0]
    assert named["documents"][0]["id"] == "guides/setup"
    listed = client.get("/v1/collections/kb/documents", params={"prefix": "guides/"}).json()
    assert [d["id"] for d in listed["data"]] == ["guides/setup"]
    assert len(listed["data"][0]["content_hash"]) == 64


def test_bad_files_are_reported_one_by_one_and_write_nothing(make_client: Any) -> None:
    client = make_client(max_file_bytes=8000)
    good = ("good.txt", b"The help desk answers on extension 4242.")
    bad = [
        ("notes.exe", b"MZ\x90\x00", 415, "unsupported_file_type"),
        ("empty.txt", b"", 400, "empty_file"),
        ("blank.md", b"   \n\n  ", 400, "empty_file"),
        ("scan.pdf", make_scanned_pdf(), 422, "unreadable_file"),
        ("broken.pdf", make_pdf(PAGES)[:300], 422, "unreadable_file"),
        ("secret.pdf", make_encrypted_pdf(PAGES), 422, "unreadable_file"),
        ("latin1.txt", "caf\xe9 menu".encode("latin-1"), 422, "unreadable_file"),
        ("huge.txt", b"word " * 2000, 413, "file_too_large"),
        ("good copy.txt", good[1], None, None),
    ]
    resp = upload(client, [good, *[(n, d) for n, d, _, _ in bad]])
    assert resp.status_code == 200, resp.text
    outcomes = resp.json()["files"]
    assert outcomes[0]["status"] == "stored"
    for i, (name, _, status, code) in enumerate(bad, start=1):
        out = outcomes[i]
        assert out["filename"] == name
        if status is None:
            assert out["status"] == "stored"
            continue
        assert out["status"] == "failed", out
        assert out["error"]["code"] == code and out["error"]["param"] == f"files[{i}]"
        assert out["error"]["message"].startswith(name), out
        assert client.get(f"/v1/collections/kb/documents/{name}").status_code == 404
    assert "no text layer, needs OCR" in outcomes[4]["error"]["message"]
    listed = client.get("/v1/collections/kb/documents").json()["data"]
    assert sorted(d["id"] for d in listed) == ["good copy.txt", "good.txt"]

    # Nothing storable: the error itself, naming the file; no collection is made.
    resp = upload(client, [("scan.pdf", make_scanned_pdf())], collection="fresh")
    assert resp.status_code == 422
    assert error_of(resp)["message"].startswith("scan.pdf: ")
    assert error_of(resp)["param"] == "files[0]"
    resp = upload(client, [("a.exe", b"x"), ("b.pdf", make_scanned_pdf())], collection="fresh")
    assert resp.status_code == 415
    message = error_of(resp)["message"]
    assert "none of the 2 files" in message and "a.exe" in message and "b.pdf" in message
    assert client.get("/v1/collections/fresh/documents").status_code == 404


def test_upload_request_errors_name_the_field(make_client: Any) -> None:
    client = make_client(max_upload_files=3)
    text = ("a.txt", b"alpha")

    def err(resp: Any, status: int, param: str) -> str:
        assert resp.status_code == status, resp.text
        error = error_of(resp)
        assert error["param"] == param, error
        return str(error["message"])

    assert "no files" in err(client.post("/v1/collections/kb/files", data={"x": "1"}), 400, "files")
    assert "no files" in err(
        client.post("/v1/collections/kb/files", json={"files": []}), 400, "files"
    )
    err(upload(client, [text] * 4), 413, "files")
    err(upload(client, [text, ("b.txt", b"beta")], id="only-one"), 400, "id")
    err(upload(client, [text], metadata="{not json"), 400, "metadata")
    err(upload(client, [text], metadata="[1, 2]"), 400, "metadata")
    err(upload(client, [text], metadata='{"page_starts": [0]}'), 400, "metadata.page_starts")
    err(upload(client, [text], collection="bad name!"), 400, "name")
    # A second file whose name gives the same id: reported, the first is stored.
    out = upload(client, [text, ("a.txt", b"other")]).json()["files"]
    assert out[0]["status"] == "stored" and out[1]["status"] == "failed"
    assert "also the id of" in out[1]["error"]["message"]
    # An id that cannot be one, given for a file.
    out = upload(client, [text, ("c.txt", b"gamma")], id=["ok", "/bad"]).json()["files"]
    assert out[1]["error"]["param"] == "id[1]"
    assert client.get("/v1/collections/kb/documents").json()["data"][0]["id"] == "a.txt"


def test_layout_sent_with_a_text_is_checked_and_used(client: Any) -> None:
    text = "First page text about badges. " * 3 + "Second page text about lockers. " * 3
    split = text.index("Second")

    def put(meta: dict[str, Any]) -> Any:
        return client.post(
            "/v1/collections/kb/documents",
            json={"documents": [{"id": "d", "text": text, "metadata": meta}]},
        )

    for bad in ([], [0, len(text) + 1], [10, 5], ["0"], [True]):
        resp = put({"page_starts": bad})
        assert resp.status_code == 400, bad
        assert error_of(resp)["param"] == "documents[0].metadata.page_starts"
    resp = put({"sections": [[0, ""]]})
    assert error_of(resp)["param"] == "documents[0].metadata.sections"
    assert (
        put(
            {"page_starts": [0, split], "sections": [[0, "Badges"], [split, "Lockers"]]}
        ).status_code
        == 200
    )
    [hit] = search(client, "lockers", top_k=1)
    assert hit["page"] in (1, 2) and hit["section"] in ("Badges", "Lockers")
    if hit["start"] < split < hit["end"]:
        assert hit["page_end"] == 2


def test_chat_sources_carry_pages_and_the_prompt_names_them(
    client: Any, fake_upstream: Any
) -> None:
    assert upload(client, [("handbook.pdf", make_pdf(PAGES))]).status_code == 200
    resp = client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-llm",
            "messages": [{"role": "user", "content": "Where can staff park for free?"}],
            "rag": {"collection": "kb", "top_k": 1},
        },
    )
    assert resp.status_code == 200, resp.text
    [source] = resp.json()["sources"]
    assert source["document_id"] == "handbook.pdf" and source["page"] == 3
    assert "page_starts" not in source["metadata"]
    system = fake_upstream.requests[-1]["messages"][0]["content"]
    assert "[1] (from handbook.pdf, p. 3)" in system
