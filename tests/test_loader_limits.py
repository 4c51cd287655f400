"""Files built to pin a core or hold gigabytes while they are parsed: each is refused (413,
naming the bound and its setting) or parsed in linear time, in a loader process that is
killed past its time budget or when its client leaves.

The findings of the second reliability round they cover: a Word document of 1.92 million
empty paragraphs (2), Markdown built for a quadratic emphasis parser (3), a Word zip that
inflates to a gigabyte (4), HTML nested a million deep (5). Every bomb is made here, small
enough to build and send in well under a second.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import httpx
import psutil
import pytest

from rag_service.app import create_app
from rag_service.loader_workers import LoaderPool
from rag_service.loaders import LoadError, LoadLimits, load_bytes
from rag_service.settings import Settings
from tests.files import declare_size, make_docx, make_docx_with_body
from tests.support import error_of, free_port, serve_app

SLOW_HTML = b"<html><body>" + b"<b>x</b> " * 1_000_000 + b"</body></html>"  # bs4: ~40 s


def upload(client: Any, name: str, data: bytes) -> Any:
    files = [("files", (name, data, "application/octet-stream"))]
    return client.post("/v1/collections/kb/files", files=files)


def refused(resp: Any, status: int, setting: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = error_of(resp)
    assert error["param"] == "files[0]" and setting in error["message"], error
    return error


# ---- 2, 4. Word zips -------------------------------------------------------------------------
def test_word_document_of_two_million_empty_paragraphs_is_refused(client):
    """226 KB that kept a loader thread at 100% for over 600 s; now counted in the raw
    markup before python-docx builds anything."""
    bomb = make_docx_with_body(b"<w:p/>" * 1_920_000)
    assert len(bomb) < 300_000
    refused(upload(client, "bomb.docx", bomb), 413, "RAG_MAX_DOCUMENT_ELEMENTS")
    assert client.get("/v1/collections").json()["data"] == []


def test_word_zip_is_checked_from_its_directory_before_inflating(client):
    """A directory that says 1 GB is refused before a byte is inflated."""
    docx = make_docx([("Normal", "small")])
    bomb = declare_size(docx, "word/document.xml", 1 << 30)
    refused(upload(client, "big.docx", bomb), 413, "RAG_MAX_UNZIPPED_BYTES")


def test_word_zip_member_cannot_inflate_past_its_declared_size(client):
    """A member that holds more than its directory says stops at the declared size (its CRC
    check then fails): the bound holds while inflating, not only before."""
    docx = make_docx_with_body(b"<w:p><w:r><w:t>" + b"a" * 20_000_000 + b"</w:t></w:r></w:p>")
    lying = declare_size(docx, "word/document.xml", 4096)
    error = refused(upload(client, "lying.docx", lying), 422, "lying.docx")
    assert "CRC" in error["message"] or "not a readable" in error["message"], error


def test_word_zip_with_too_many_entries_is_refused(make_client):
    client = make_client(max_zip_entries=5)
    refused(upload(client, "a.docx", make_docx([("Normal", "x")])), 413, "RAG_MAX_ZIP_ENTRIES")


# ---- 3. Markdown -----------------------------------------------------------------------------
def test_markdown_built_for_a_quadratic_emphasis_parser_loads():
    """1.4 MB of ``*a **a `` that timed out at 180 s: only blocks are parsed (linear), within
    a 10 s budget that a quadratic parse would overrun. (Parsed, not uploaded: embedding a
    million tokens of it is not what this test is about.)"""
    pool = LoaderPool(workers=1, timeout_s=10)
    try:
        bomb = ("# Emphasis\n\n" + "*a **a " * 200_000).encode()
        [doc] = pool.load_sync(bomb, "bomb.md", "bomb.md")
    finally:
        pool.close()
    assert doc.metadata["sections"] == [[0, "Emphasis"]]
    assert doc.text.endswith("*a **a ")


# ---- 5. HTML ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["div", "b"])
def test_deeply_nested_html_is_refused(client, tag):
    bomb = (f"<{tag}>" * 200_000 + "x").encode()
    refused(upload(client, "deep.html", bomb), 413, "RAG_MAX_HTML_DEPTH")


def test_html_past_the_element_bound_is_refused(make_client):
    client = make_client(max_document_elements=1000)
    refused(upload(client, "wide.html", b"<p>x</p>" * 1001), 413, "RAG_MAX_DOCUMENT_ELEMENTS")
    assert upload(client, "ok.html", b"<p>x</p>" * 999).status_code == 200


def test_html_nested_as_the_parser_nests_it():
    """End tags close up to their open element, unclosed paragraphs stay open: the scan
    counts depth the way html.parser builds it."""
    limits = LoadLimits(html_depth=3)
    assert load_bytes(b"<div><b><i>x</div>" * 50, "a.html", "a", limits)  # closed each time
    with pytest.raises(LoadError, match="RAG_MAX_HTML_DEPTH"):
        load_bytes(b"<p>one<p>two<p>three<p>four", "a.html", "a", limits)
    assert load_bytes(b"<!-- <div><div><div><div> -->text", "a.html", "a", limits)


# ---- the time budget and the client ----------------------------------------------------------
def test_a_file_past_its_time_budget_is_stopped_and_its_worker_replaced(make_client):
    client = make_client(loader_timeout_s=1, max_document_elements=10**7)
    refused(upload(client, "slow.html", SLOW_HTML), 413, "RAG_LOADER_TIMEOUT_S")
    assert upload(client, "next.html", b"<p>next file</p>").status_code == 200


def _tree_cpu_seconds() -> float:
    """CPU time of this process and every process under it (the loader workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(child.cpu_times()[:2])
    return total


def test_a_client_that_leaves_cancels_its_upload(tmp_path, embedder, fake_server):
    """The client gives up after 1 s: the file's loader process is killed, so nothing keeps a
    core busy (a loader thread used to go on at 100% until the parse ended)."""
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), upstream_url=fake_server.url)
    pool = LoaderPool(timeout_s=600, limits=LoadLimits(elements=10**7))
    with serve_app(create_app(settings, embedder=embedder, loaders=pool), settings.port) as url:
        files = [("files", ("slow.html", SLOW_HTML, "text/html"))]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/collections/kb/files", files=files, timeout=1.5)
        time.sleep(1.0)  # the disconnect reaches the server, the worker is killed
        before = _tree_cpu_seconds()
        time.sleep(1.5)
        busy = (_tree_cpu_seconds() - before) / 1.5
        assert busy < 0.5, f"{busy:.2f} cores still busy after the client left"
        assert httpx.get(f"{url}/v1/collections", timeout=5).json()["data"] == []
    pool.close()
