"""Hostile and careless requests, as HTTP cases: the shapes of the second reliability round.

Each :class:`Case` sends one request (or a few) to a running service and says which statuses
are right. ``tests/test_fuzz.py`` replays the cheap ones against the fuzzed server on both
engines; ``benchmarks/bench_hardening.py`` replays all of them at full size against
``rag-service serve`` on the local model, timing each and reading the server's memory and CPU
around it. ``scale`` shrinks the bombs that are large only to be large (the fuzz suite runs
them at a size CI builds in milliseconds; the checks they meet are the same).
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tests.files import declare_size, make_docx, make_docx_with_body

__all__ = ["COLLECTION", "Case", "cases", "docx_with_huge_text_node"]

COLLECTION = "hostile"
Send = Callable[[httpx.Client], httpx.Response | list[httpx.Response]]


@dataclass(frozen=True)
class Case:
    """One shape: its name, the finding it reproduces (numbered as in the round's list), how
    it is sent, and the statuses that are right answers."""

    name: str
    finding: int
    send: Send
    expect: tuple[int, ...]
    local_model: bool = False  # needs the local generation backend to mean anything


def _upload(name: str, data: bytes, **form: str) -> Send:
    def send(http: httpx.Client) -> httpx.Response:
        files = [("files", (name, data, "application/octet-stream"))]
        return http.post(f"/v1/collections/{COLLECTION}/files", files=files, data=form)

    return send


def _post(path: str, body: object, **headers: str) -> Send:
    return lambda http: http.post(path, json=body, headers=headers)


def _chat(**fields: object) -> Send:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, **fields}
    return _post("/v1/chat/completions", body)


def _huge_header(size: int) -> Send:
    """A request with an Authorization header of ``size`` bytes, over a raw socket: the
    service answers 431 and closes while the client still sends, which httpx reports as an
    error rather than the answer."""

    def send(http: httpx.Client) -> httpx.Response:
        url = http.base_url
        head = f"GET /v1/collections HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        request = head.encode() + b"Authorization: Bearer " + b"k" * size + b"\r\n\r\n"
        with socket.create_connection((url.host, url.port or 80), timeout=30) as conn:
            with contextlib.suppress(OSError):
                conn.sendall(request)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    answer += chunk
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        body = answer.partition(b"\r\n\r\n")[2]
        return httpx.Response(status, content=body)

    return send


def docx_with_huge_text_node(size: int) -> bytes:
    """A Word document whose document.xml holds one text node of ``size`` bytes, deflated
    as it is written (a gigabyte compresses to about a megabyte, built in a few seconds)."""
    base = zipfile.ZipFile(io.BytesIO(make_docx([("Normal", "x")])))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zipped:
        for info in base.infolist():
            if info.filename != "word/document.xml":
                zipped.writestr(info.filename, base.read(info.filename))
                continue
            xml = base.read(info.filename)
            start = xml.index(b"<w:body>") + len(b"<w:body>")
            with zipped.open(info.filename, "w", force_zip64=True) as member:
                member.write(xml[:start] + b"<w:p><w:r><w:t>")
                block = b"a" * (1 << 20)
                for _ in range(size // len(block)):
                    member.write(block)
                member.write(b"</w:t></w:r></w:p>" + xml[start:])
    return out.getvalue()


def cases(scale: float = 1.0) -> list[Case]:
    """Every shape; ``scale`` < 1 shrinks the bombs whose size is not what is tested (the
    Markdown bomb, the HTML nesting, the header), never below the bound they meet."""

    def n(count: int) -> int:
        return max(1, int(count * scale))

    v1 = f"/v1/collections/{COLLECTION}"
    long_stops = [chr(ord("a") + i) * 2000 for i in range(8)]
    nested = 100_000
    bad_ids = ["a//b", "/lead", "trail/", "ctl\u0007", "x" * 5000, "nl\n", "dots/../victim2"]
    out = [
        Case("stop_5000_chars", 1, _chat(stop="q" * 5000), (400,)),
        Case("eight_2000_char_stops", 1, _chat(stop=long_stops), (400,)),
        Case("four_256_char_stops", 1, _chat(stop=[c[:256] for c in long_stops[:4]]), (200,), True),
        Case(
            "docx_1_92m_empty_paragraphs",
            2,
            _upload("paragraphs.docx", make_docx_with_body(b"<w:p/>" * 1_920_000)),
            (413,),
        ),
        Case(
            "markdown_emphasis_1_4mb",
            3,
            _upload("emphasis.md", ("# Emphasis\n\n" + "*a **a " * n(200_000)).encode()),
            (200, 400),  # 400 past RAG_MAX_DOCUMENT_CHARS, after it was parsed
        ),
        Case(
            "docx_declares_1gb",
            4,
            _upload(
                "huge.docx",
                declare_size(make_docx([("Normal", "x")]), "word/document.xml", 1 << 30),
            ),
            (413,),
        ),
        Case("html_1m_nested_div", 5, _upload("div.html", b"<div>" * n(1_000_000)), (413,)),
        Case("html_200k_nested_b", 5, _upload("b.html", b"<b>" * n(200_000) + b"x"), (413,)),
        Case("jsonl_line_100k_brackets", 6, _upload("deep.jsonl", b"[" * nested + b"\n"), (422,)),
        Case(
            "metadata_part_100k_deep",
            6,
            _upload("a.txt", b"text", metadata='{"a": ' + "[" * nested + "]" * nested + "}"),
            (400,),
        ),
        Case(
            "metadata_part_900_deep",
            6,
            _upload("a.txt", b"text", metadata='{"a": ' + "[" * 900 + "]" * 900 + "}"),
            (400,),
        ),
        Case(
            "jsonl_bad_ids",
            7,
            lambda http: [
                _upload("ids.jsonl", json.dumps({"id": i, "text": "t"}).encode())(http)  # type: ignore[misc]
                for i in bad_ids
            ],
            (400,),
        ),
        Case(
            "json_dot_segment_id",
            8,
            _post(f"{v1}/documents", {"documents": [{"id": "dots/../victim2", "text": "x"}]}),
            (400,),
        ),
        Case(
            "cross_site_text_plain_post",
            9,
            lambda http: http.post(
                f"{v1}/documents",
                content=json.dumps({"documents": [{"id": "planted", "text": "x"}]}),
                headers={"Content-Type": "text/plain", "Origin": "http://evil.example"},
            ),
            (403, 415),
        ),
        Case(
            "cross_site_multipart_upload",
            9,
            lambda http: http.post(
                f"{v1}/files",
                files=[("files", ("planted.txt", b"x", "text/plain"))],
                headers={"Origin": "http://evil.example"},
            ),
            (403,),
        ),
        Case(
            "dns_rebinding_host",
            9,
            lambda http: http.get("/v1/collections", headers={"Host": "evil.example"}),
            (403,),
        ),
        Case(
            "embeddings_2048_x_8192_chars",
            10,
            _post("/v1/embeddings", {"input": [("word " * 1700)[:8192]] * 2048}),
            (413,),
        ),
        Case(
            "trailing_newline_patterns",
            11,
            lambda http: [
                _post(f"{v1}/documents", {"documents": [{"id": "nl\n", "text": "x"}]})(http),  # type: ignore[list-item]
                _post(
                    "/v1/keys",
                    {"name": "k", "scopes": [{"collection": "colB\n", "access": "read"}]},
                )(http),  # type: ignore[list-item]
                _post(f"{v1}/search", {"query": "x", "filter": {"team\n": "a"}})(http),  # type: ignore[list-item]
            ],
            (400, 404),
        ),
        Case("authorization_header_10mb", 12, _huge_header(n(10_000_000)), (431,)),
    ]
    return out
