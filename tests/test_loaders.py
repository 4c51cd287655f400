"""rag_service.loaders on real files: PDFs written by hand and encrypted by pypdf, Word files
written by python-docx, HTML, Markdown, reST, text and JSONL, from bytes and from disk."""

from __future__ import annotations

import io
import json
import logging
import random
from bisect import bisect_right
from pathlib import Path

import pytest
from docx import Document

from rag_service.loaders import (
    CONTENT_TYPES,
    SUFFIXES,
    LoadError,
    LoadLimits,
    discover,
    load,
    load_bytes,
)
from tests.files import make_docx, make_encrypted_pdf, make_pdf, make_scanned_pdf


def load_error(data: bytes, filename: str) -> LoadError:
    with pytest.raises(LoadError) as info:
        load_bytes(data, filename, "doc")
    return info.value


def one(data: bytes, filename: str, doc_id: str = "doc"):
    docs = load_bytes(data, filename, doc_id)
    assert len(docs) == 1
    assert docs[0].id == doc_id
    assert docs[0].metadata["source"] == doc_id
    assert all(value not in ("", None, []) for value in docs[0].metadata.values())
    return docs[0]


def assert_sections(text: str, sections, expected: list[str], *, line: str = "") -> None:
    """Headings as expected, in order; rebuilt text (HTML, Word) starts with each heading at
    its offset; raw text (``line="raw"``: Markdown, reST) has the heading's line there."""
    assert [heading for _, heading in sections] == expected
    offsets = [offset for offset, _ in sections]
    assert offsets == sorted(offsets)
    for offset, heading in sections:
        assert isinstance(offset, int)
        if line == "raw":
            assert offset == 0 or text[offset - 1] in "\r\n", (offset, heading)
            assert heading in text[offset:].splitlines()[0], (offset, heading)
        else:
            assert text[offset:].startswith(heading), (offset, heading)


def test_api_names_every_suffix_and_content_type():
    assert set(SUFFIXES) == {
        ".pdf", ".docx", ".html", ".htm", ".md", ".markdown", ".rst", ".txt", ".jsonl",
    }  # fmt: skip
    assert set(CONTENT_TYPES) == set(SUFFIXES)
    assert CONTENT_TYPES[".pdf"] == "application/pdf"
    assert CONTENT_TYPES[".docx"].endswith("wordprocessingml.document")
    assert CONTENT_TYPES[".rst"] == "text/x-rst"
    assert CONTENT_TYPES[".jsonl"] == "application/jsonl"


# --- PDF ----------------------------------------------------------------------------------------

PAGES = [
    "Remote access guide\nConnect with the corp client (v2.1).",
    "",
    "Escapes survive: back\\slash and (parentheses).",
    "The printer on floor 3 needs toner.\nCall extension 4711.\nAsk for Dana.",
]


def test_pdf_text_pages_page_starts_and_title():
    doc = one(make_pdf(PAGES, title="Office Handbook"), "handbook.pdf")
    meta = doc.metadata
    assert meta["content_type"] == "application/pdf"
    assert meta["title"] == "Office Handbook"
    assert meta["pages"] == 4
    first, _, third, fourth = PAGES
    # Pages joined by a blank line; the empty page adds no text and starts where page 1 ends.
    assert doc.text == f"{first}\n\n{third}\n\n{fourth}"
    assert meta["page_starts"] == [
        0,
        len(first),
        len(first) + 2,
        len(first) + 2 + len(third) + 2,
    ]
    for start, page in zip(meta["page_starts"], PAGES, strict=True):
        assert doc.text[start:].startswith(page)
    # A chunk's page: the text of page 4 spans three lines, all of them on page 4.
    call = doc.text.index("Call extension 4711")
    assert bisect_right(meta["page_starts"], call) == 4
    assert bisect_right(meta["page_starts"], doc.text.index("back\\slash")) == 3
    assert bisect_right(meta["page_starts"], 0) == 1


def test_pdf_without_title_leaves_the_key_out():
    doc = one(make_pdf(["Only page"]), "plain.pdf")
    assert "title" not in doc.metadata
    assert doc.metadata["page_starts"] == [0]
    assert doc.metadata["pages"] == 1


def test_pdf_suffix_is_case_insensitive():
    assert one(make_pdf(["Upper case suffix"]), "SCAN.PDF").text == "Upper case suffix"


def test_scanned_pdf_has_no_text_layer():
    error = load_error(make_scanned_pdf(), "scan.pdf")
    assert error.kind == "no_text_layer"
    assert str(error) == "scan.pdf: no text layer, needs OCR"
    assert error.filename == "scan.pdf"


def test_encrypted_pdf_needs_a_password_but_an_empty_one_is_tried():
    error = load_error(make_encrypted_pdf(["Salary table"]), "locked.pdf")
    assert error.kind == "encrypted"
    assert str(error).startswith("locked.pdf: encrypted")
    # Owner password only (printing/copying restrictions): readers open it, and so do we.
    assert one(make_encrypted_pdf(["Open to all"], password=""), "open.pdf").text == "Open to all"


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_truncated_pdf_is_a_parse_error_without_warnings(keep, caplog):
    data = make_pdf(PAGES)
    with caplog.at_level(logging.WARNING):
        error = load_error(data[: int(len(data) * keep)], "cut.pdf")
    assert error.kind == "parse"
    assert str(error).startswith("cut.pdf: not a readable PDF (")
    assert not caplog.records


def test_words_placed_by_positioning_keep_their_spaces():
    """TeX-made PDFs (the Debian FAQ's among them) draw no space glyphs between words, only
    offsets; the text layer must still read as words (pypdf ran them together)."""
    from tests.files import make_kerned_pdf

    text = one(make_kerned_pdf(["Debian", "includes", "complete", "source"]), "k.pdf").text
    assert text.split() == ["Debian", "includes", "complete", "source"]


def test_garbage_named_pdf_is_a_parse_error():
    error = load_error(b"this is not a pdf at all", "fake.pdf")
    assert error.kind == "parse"
    assert "fake.pdf" in str(error)


# --- Word ---------------------------------------------------------------------------------------


def test_docx_paragraphs_headings_and_title():
    data = make_docx(
        [
            ("Title", "Employee Handbook"),
            ("Normal", "Welcome to the company."),
            ("Normal", "   "),
            ("Heading 1", "Leave"),
            ("Normal", "Employees get 30 days of paid leave."),
            ("Heading 2", "Sick leave"),
            ("Normal", "Tell your manager before 9am."),
        ],
        title="HR Handbook 2024",
    )
    doc = one(data, "hr.docx")
    assert doc.metadata["content_type"] == CONTENT_TYPES[".docx"]
    assert doc.metadata["title"] == "HR Handbook 2024"
    assert doc.text == (
        "Employee Handbook\nWelcome to the company.\nLeave\n"
        "Employees get 30 days of paid leave.\nSick leave\nTell your manager before 9am."
    )
    sections = doc.metadata["sections"]
    assert_sections(doc.text, sections, ["Employee Handbook", "Leave", "Sick leave"])
    assert [offset for offset, _ in sections] == [0, 42, 85]


def test_docx_title_falls_back_to_the_first_heading_1():
    data = make_docx([("Normal", "Preface."), ("Heading 2", "Minor"), ("Heading 1", "Install")])
    doc = one(data, "guide.docx")
    assert doc.metadata["title"] == "Install"
    data = make_docx([("Normal", "Only body text.")])
    doc = one(data, "memo.docx")
    assert "title" not in doc.metadata
    assert "sections" not in doc.metadata


def test_docx_tables_are_read_row_by_row_in_document_order():
    document = Document()
    document.add_heading("Prices", level=1)
    table = document.add_table(rows=2, cols=3)
    for col, text in enumerate(["Item", "Size", "Price"]):
        table.cell(0, col).text = text
    table.cell(1, 0).merge(table.cell(1, 1)).text = "Coffee, large"
    table.cell(1, 2).text = "3 EUR"
    document.add_paragraph("Prices include tax.")
    out = io.BytesIO()
    document.save(out)
    doc = one(out.getvalue(), "prices.docx")
    assert doc.text == "Prices\nItem | Size | Price\nCoffee, large | 3 EUR\nPrices include tax."


@pytest.mark.parametrize(
    "data",
    [b"not a zip", b"PK\x03\x04broken zip", make_pdf(["a pdf named docx"])],
    ids=["text", "broken-zip", "pdf"],
)
def test_docx_that_is_not_a_word_file_is_a_parse_error(data):
    error = load_error(data, "report.docx")
    assert error.kind == "parse"
    assert str(error).startswith("report.docx: not a readable Word document (")


def test_empty_docx_is_empty():
    assert load_error(make_docx([("Normal", "")]), "blank.docx").kind == "empty"


# --- HTML ---------------------------------------------------------------------------------------

PAGE = b"""<!doctype html>
<html><head><title>Office hours | ACME</title><style>p { color: red }</style>
<script>var tracking = 1;</script></head>
<body>
<header><a href="/">ACME home</a> <form><input name="q"> Search</form></header>
<nav><ul><li>Products</li><li>Careers</li></ul></nav>
<div role="navigation">Breadcrumbs here</div>
<main>
  <article>
    <header><h1>Office <em>hours</em></h1></header>
    <p>The office opens
       at <b>8am</b>.<br>It is closed on Sundays.</p>
    <script>document.write("injected")</script>
    <noscript>Enable JavaScript</noscript>
    <h2>Parking</h2>
    <table><tr><th>Garage</th><th>Price</th></tr><tr><td>B</td><td>free</td></tr></table>
    <pre>
  make install
    --prefix /opt
</pre>
    <p hidden>Secret draft</p>
  </article>
</main>
<aside>Related: cafeteria menu</aside>
<footer>Copyright ACME</footer>
<div role="contentinfo">Imprint</div>
</body></html>"""


def test_html_drops_boilerplate_keeps_main_content():
    doc = one(PAGE, "office.html")
    assert doc.metadata["content_type"] == "text/html"
    assert doc.metadata["title"] == "Office hours | ACME"
    assert doc.text == (
        "Office hours\nThe office opens at 8am.\nIt is closed on Sundays.\nParking\n"
        "Garage | Price\nB | free\n  make install\n    --prefix /opt"
    )
    for junk in ("tracking", "injected", "ACME home", "Products", "Breadcrumbs", "cafeteria",
                 "Copyright", "Imprint", "Search", "JavaScript", "Secret"):  # fmt: skip
        assert junk not in doc.text
    assert_sections(doc.text, doc.metadata["sections"], ["Office hours", "Parking"])


def test_html_without_main_uses_the_largest_article_and_h1_title():
    html = b"""<html><body><nav>Menu</nav>
    <article><h2>Teaser</h2><p>Short.</p></article>
    <article><h1>Travel policy</h1><p>Book trains for trips under 500 km.</p>
      <h3>Receipts</h3><p>Keep all receipts for six months.</p></article>
    <footer>Footer</footer></body></html>"""
    doc = one(html, "travel.htm")
    assert doc.metadata["title"] == "Travel policy"
    assert doc.text.startswith("Travel policy\nBook trains")
    assert "Teaser" not in doc.text and "Menu" not in doc.text
    assert_sections(doc.text, doc.metadata["sections"], ["Travel policy", "Receipts"])


def test_html_page_wrapped_in_a_form_keeps_its_content():
    html = b"<html><body><form action=/x><h1>All in a form</h1><p>Body text.</p></form></body>"
    assert one(html, "webforms.html").text == "All in a form\nBody text."


def test_html_that_is_only_boilerplate_falls_back_to_visible_text():
    doc = one(b"<nav>Only navigation <script>x()</script></nav>", "nav.html")
    assert doc.text == "Only navigation"


def test_html_with_only_markup_is_empty():
    assert load_error(b"<html><head><script>x()</script></head></html>", "a.html").kind == "empty"


# --- Markdown -----------------------------------------------------------------------------------

MARKDOWN = """---
title: "Deploy guide"
tags: [ops]
---
# Deploying

Run the script:

```sh
# this is a shell comment, not a heading
./deploy.sh
```

Rolling back
============

Use the previous tag.

## Checks ##

    # indented code is not a heading either
"""


def test_markdown_keeps_text_and_finds_real_headings():
    doc = one(MARKDOWN.encode(), "deploy.md")
    assert doc.text == MARKDOWN
    assert doc.metadata["content_type"] == "text/markdown"
    assert doc.metadata["title"] == "Deploy guide"  # front matter wins over the first heading
    sections = doc.metadata["sections"]
    assert_sections(doc.text, sections, ["Deploying", "Rolling back", "Checks"], line="raw")
    assert sections[0][0] == MARKDOWN.index("# Deploying")
    assert doc.text[sections[2][0] :].startswith("## Checks ##")


def test_markdown_title_is_the_first_level_1_heading():
    text = "Intro line\n\n## Setup\n\nSteps.\n\nOverview\n---\n\n# Real title\n"
    doc = one(text.encode(), "notes.markdown")
    assert doc.metadata["title"] == "Real title"
    expected = ["Setup", "Overview", "Real title"]
    assert_sections(doc.text, doc.metadata["sections"], expected, line="raw")
    doc = one(b"## Only level two\n\ntext\n", "two.md")
    assert doc.metadata["title"] == "Only level two"


def test_markdown_with_crlf_line_ends():
    text = "# One\r\n\r\nBody\r\n\r\nTwo\r\n===\r\n"
    doc = one(text.encode(), "win.md")
    assert doc.text == text
    assert_sections(doc.text, doc.metadata["sections"], ["One", "Two"], line="raw")


def test_markdown_without_headings_has_no_sections():
    doc = one(b"Just a paragraph.\n", "plain.md")
    assert "sections" not in doc.metadata and "title" not in doc.metadata


# --- reStructuredText ---------------------------------------------------------------------------

RST = """==============
 User Manual
==============

Intro paragraph.

Installation
------------

Run ``pip install``.

  Indented
  --------

Short
--

Usage
~~~~~
Call it.
"""


def test_rst_overlined_and_underlined_titles():
    doc = one(RST.encode(), "manual.rst")
    assert doc.text == RST
    assert doc.metadata["content_type"] == "text/x-rst"
    assert doc.metadata["title"] == "User Manual"
    sections = doc.metadata["sections"]
    assert_sections(doc.text, sections, ["User Manual", "Installation", "Usage"], line="raw")
    assert sections[0][0] == RST.index(" User Manual")
    assert sections[1][0] == RST.index("Installation")


# --- text, encodings, empty, unsupported --------------------------------------------------------


def test_plain_text_as_is():
    doc = one(b"Employees get 30 days of paid leave.\n", "leave.txt")
    assert doc.text == "Employees get 30 days of paid leave.\n"
    assert doc.metadata == {"source": "doc", "content_type": "text/plain"}


@pytest.mark.parametrize("suffix", [".txt", ".md", ".rst", ".html", ".jsonl"])
def test_text_that_is_not_utf8_is_a_parse_error(suffix):
    error = load_error("Café au lait".encode("latin-1"), f"menu{suffix}")
    assert error.kind == "parse"
    assert str(error).startswith(f"menu{suffix}: not UTF-8 text")


def test_binary_data_is_not_text_but_utf8_bom_and_utf16_are():
    assert load_error(b"ab\x00\x01cd", "blob.txt").kind == "parse"
    assert one(b"\xef\xbb\xbfwith BOM", "bom.txt").text == "with BOM"
    assert one("UTF-16 text".encode("utf-16"), "wide.txt").text == "UTF-16 text"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_empty_bytes_are_empty(suffix):
    error = load_error(b"", f"nothing{suffix}")
    assert error.kind == "empty"
    assert str(error) == f"nothing{suffix}: empty file"


@pytest.mark.parametrize("suffix", [".txt", ".md", ".rst", ".html"])
def test_whitespace_only_is_empty(suffix):
    error = load_error(b" \n\t\n", f"blank{suffix}")
    assert error.kind == "empty"
    assert str(error) == f"blank{suffix}: no text"


def test_unsupported_suffix_lists_supported_ones():
    error = load_error(b"MZ\x90\x00", "setup.exe")
    assert error.kind == "unsupported"
    assert str(error).startswith("setup.exe: unsupported file type '.exe'")
    assert all(suffix in str(error) for suffix in SUFFIXES)
    assert load_error(b"text", "README").kind == "unsupported"


@pytest.mark.parametrize("suffix", [".pdf", ".docx", ".html", ".md", ".rst", ".txt", ".jsonl"])
def test_random_and_damaged_bytes_only_ever_raise_load_error(suffix):
    rng = random.Random(suffix)
    samples = [rng.randbytes(rng.randint(1, 400)) for _ in range(5)]
    for base in (make_pdf(PAGES), make_docx([("Heading 1", "Head"), ("Normal", "body")])):
        for _ in range(5):
            damaged = bytearray(base)
            for _ in range(8):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            samples.append(bytes(damaged))
    for data in samples:
        try:
            docs = load_bytes(data, f"fuzz{suffix}", "doc")
        except LoadError as error:
            assert error.kind in ("parse", "empty", "no_text_layer", "encrypted")
            assert str(error).startswith(f"fuzz{suffix}")
        else:
            assert all(doc.text.strip() for doc in docs)


# --- JSONL --------------------------------------------------------------------------------------


def test_jsonl_one_document_per_line():
    lines = [
        json.dumps({"id": "faq-parking", "text": "Parking is free.", "metadata": {"kind": "faq"}}),
        "",
        json.dumps({"text": "Lunch is at noon."}),
        json.dumps({"text": "   "}),
    ]
    docs = load_bytes("\n".join(lines).encode(), "faq.jsonl", "kb/faq.jsonl")
    assert [(d.id, d.text) for d in docs] == [
        ("faq-parking", "Parking is free."),
        ("kb/faq.jsonl#3", "Lunch is at noon."),
    ]
    assert docs[0].metadata == {
        "source": "kb/faq.jsonl",
        "content_type": "application/jsonl",
        "kind": "faq",
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\nnot json\n', "bad.jsonl:2: not JSON"),
        ('{"text": 5}\n', "bad.jsonl:1: expected an object with a string 'text'"),
        ('{"text": "a", "metadata": [1]}\n', "bad.jsonl:1: 'metadata' must be an object"),
    ],
)
def test_jsonl_errors_name_the_line(content, message):
    error = load_error(content.encode(), "bad.jsonl")
    assert error.kind == "parse"
    assert str(error).startswith(message)


def test_jsonl_with_no_documents_is_empty():
    assert load_error(b"\n  \n", "none.jsonl").kind == "empty"


# --- disk ---------------------------------------------------------------------------------------


def test_discover_and_load_from_disk(tmp_path: Path):
    root = tmp_path / "kb"
    (root / "guides").mkdir(parents=True)
    (root / "guides" / "Manual.PDF").write_bytes(make_pdf(["Page one", "Page two"], title="M"))
    (root / "guides" / "hr.docx").write_bytes(make_docx([("Heading 1", "Leave")]))
    (root / "index.htm").write_bytes(b"<h1>Home</h1><p>Welcome.</p>")
    (root / "notes.markdown").write_text("# Notes\n")
    (root / "api.rst").write_text("API\n===\n")
    (root / "a.txt").write_text("plain")
    (root / "faq.jsonl").write_text('{"text": "q"}\n')
    (root / "setup.exe").write_bytes(b"MZ")
    (root / ".DS_Store").write_bytes(b"\x00")
    found = list(discover([root]))
    assert [doc_id for _, doc_id in found] == [
        "kb/a.txt",
        "kb/api.rst",
        "kb/faq.jsonl",
        "kb/guides/Manual.PDF",
        "kb/guides/hr.docx",
        "kb/index.htm",
        "kb/notes.markdown",
    ]
    pdf_path, pdf_id = found[3]
    (doc,) = load(pdf_path, pdf_id)
    assert doc.id == "kb/guides/Manual.PDF"
    assert doc.text == "Page one\n\nPage two"
    assert doc.metadata == {
        "source": "kb/guides/Manual.PDF",
        "content_type": "application/pdf",
        "pages": 2,
        "page_starts": [0, 10],
        "title": "M",
    }
    assert [d.text for path, doc_id in found for d in load(path, doc_id)][-1] == "# Notes\n"
    assert list(discover([root / "a.txt"])) == [(root / "a.txt", "a.txt")]


def test_missing_paths_are_unreadable(tmp_path: Path):
    with pytest.raises(LoadError) as info:
        list(discover([tmp_path / "missing"]))
    assert info.value.kind == "unreadable"
    assert "no such file" in str(info.value)
    with pytest.raises(LoadError) as info:
        load(tmp_path / "gone.pdf", "gone.pdf")
    assert info.value.kind == "unreadable"
    assert str(info.value).startswith("gone.pdf: cannot read")


def test_bomb_shapes_only_ever_raise_load_error_or_load():
    """Random files of the shapes that pinned cores or held gigabytes (nesting, width,
    emphasis runs, empty paragraphs, deep JSON, bad ids), against small bounds: each loads or
    is refused with a LoadError, never anything else."""
    from tests.files import make_docx_with_body

    rng = random.Random(23)
    limits = LoadLimits(unzipped_bytes=2_000_000, zip_entries=64, elements=2000, html_depth=40)
    tags = ["div", "b", "p", "li", "section", "header", "form", "table", "td", "pre", "h1"]
    for _ in range(40):
        n = rng.randint(1, 3000)
        tag = rng.choice(tags)
        close = rng.random() < 0.5
        samples = [
            (f"<{tag}>" * n + "x" + (f"</{tag}>" * n if close else ""), ".html"),
            ("".join(f"<{rng.choice(tags)}>w" for _ in range(n)), ".html"),
            ("# T\n\n" + rng.choice(["*a **a ", "_a __a ", "[a](", "`a``", "> ", "- "]) * n, ".md"),
            ("\n".join(["[" * rng.randint(1, 80) + "]" * rng.randint(0, 80)] * 3), ".jsonl"),
            (
                json.dumps(
                    {"id": rng.choice(["a/../b", "/x", "ok", "a\x01", "x" * 600]), "text": "t"}
                ),
                ".jsonl",
            ),
        ]
        for text, suffix in samples:
            try:
                docs = load_bytes(text.encode(), f"bomb{suffix}", "doc", limits)
            except LoadError as error:
                assert error.kind in ("parse", "empty", "limit", "bad_id"), (error, text[:60])
            else:
                assert all(doc.text.strip() for doc in docs)
        body = b"<w:p/>" * rng.randint(1, 4000)
        try:
            load_bytes(make_docx_with_body(body), "bomb.docx", "doc", limits)
        except LoadError as error:
            assert error.kind == "limit" and "RAG_MAX_DOCUMENT_ELEMENTS" in str(error)
