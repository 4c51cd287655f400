"""Real document files, made in memory, for the loader, upload and browser tests.

* :func:`make_pdf` writes a PDF 1.4 by hand: one Helvetica text object per page, one text line
  per ``"\\n"``-separated line, with a correct cross-reference table, so pypdf (and any viewer)
  reads it without repairs and extracts each page's text as given;
* :func:`make_kerned_pdf` places words with TJ offsets and no space glyphs (as TeX does);
* :func:`make_scanned_pdf` is a valid one-page PDF with only a filled rectangle: no text layer,
  as a scanner without OCR produces;
* :func:`make_encrypted_pdf` encrypts :func:`make_pdf`'s output with pypdf (RC4, no extra
  crypto package needed) under a user password;
* :func:`make_docx` builds a Word document with python-docx from ``(style, text)`` pairs.

Text in PDFs is limited to characters of Windows-1252 (the font's encoding); the helpers raise
``UnicodeEncodeError`` for others rather than silently writing a different text.
"""

from __future__ import annotations

import io

__all__ = ["make_docx", "make_encrypted_pdf", "make_kerned_pdf", "make_pdf", "make_scanned_pdf"]

_FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"


def _pdf_string(text: str) -> bytes:
    """A PDF literal string: ``(...)`` with ``\\``, ``(``, ``)`` and CR escaped."""
    raw = text.encode("cp1252")
    raw = raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
    return b"(" + raw.replace(b"\r", b"\\r") + b")"


def _text_stream(text: str) -> bytes:
    """A content stream drawing ``text`` line by line (12 pt Helvetica, 14 pt leading)."""
    ops = [b"BT", b"/F1 12 Tf", b"14 TL", b"72 720 Td"]
    for i, line in enumerate(text.split("\n")):
        if i:
            ops.append(b"T*")
        if line:
            ops.append(_pdf_string(line) + b" Tj")
    ops.append(b"ET")
    return b"\n".join(ops)


def _stream(content: bytes) -> bytes:
    return b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"


def _assemble(contents: list[bytes], *, title: str | None, fonts: bool) -> bytes:
    """Catalog, page tree, font, one page and one content stream per page, optional info
    dictionary; then the xref table with each object's byte offset, the trailer and EOF."""
    pages = len(contents)
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(pages)), pages),
        _FONT,
    ]
    resources = b"<< /Font << /F1 3 0 R >> >>" if fonts else b"<< >>"
    for i, content in enumerate(contents):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792]"
            b" /Resources %s /Contents %d 0 R >>" % (resources, 5 + 2 * i)
        )
        objects.append(_stream(content))
    info = b""
    if title is not None:
        objects.append(b"<< /Title %s /Producer (tests) >>" % _pdf_string(title))
        info = b" /Info %d 0 R" % len(objects)
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\n" % (len(objects) + 1, info)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def make_pdf(pages: list[str], *, title: str | None = None) -> bytes:
    """A PDF with a text layer: page ``i`` shows ``pages[i]`` (lines split on ``"\\n"``; an
    empty string makes a page without text); ``title`` goes to the document information."""
    return _assemble([_text_stream(text) for text in pages], title=title, fonts=True)


def make_kerned_pdf(words: list[str]) -> bytes:
    """A one-page PDF whose words are placed with TJ positioning instead of space characters,
    as TeX and many typesetters write them (the gap is a kerning offset, not a glyph)."""
    spaced = b" -333 ".join(_pdf_string(w) for w in words)
    content = b"BT\n/F1 12 Tf\n72 720 Td\n[" + spaced + b"] TJ\nET"
    return _assemble([content], title=None, fonts=True)


def make_scanned_pdf() -> bytes:
    """A valid one-page PDF whose page holds only a filled rectangle: no text to extract."""
    return _assemble([b"0.2 0.4 0.8 rg\n72 72 468 648 re\nf"], title=None, fonts=False)


def make_encrypted_pdf(pages: list[str], password: str = "secret") -> bytes:
    """:func:`make_pdf` encrypted (RC4-128) so that opening needs ``password``; an empty
    ``password`` gives a PDF that any reader opens (owner password only)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(pages))))
    writer.encrypt(user_password=password, owner_password="owner-" + password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx(paragraphs: list[tuple[str, str]], *, title: str | None = None) -> bytes:
    """A Word document with one paragraph per ``(style, text)`` pair, e.g.
    ``("Heading 1", "Install")``, ``("Normal", "Run make.")``; ``title`` sets the core
    properties' title."""
    from docx import Document

    doc = Document()
    for style, text in paragraphs:
        doc.add_paragraph(text, style=style)
    if title is not None:
        doc.core_properties.title = title
    out = io.BytesIO()
    doc.save(out)
    return out.getvalue()


def make_docx_with_body(body: bytes) -> bytes:
    """A Word document whose body holds ``body`` (raw WordprocessingML, e.g. ``b"<w:p/>" *
    n``) ahead of a real paragraph: the shape of a zip bomb made small enough for a test."""
    import zipfile

    base = zipfile.ZipFile(io.BytesIO(make_docx([("Normal", "a real paragraph")])))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zipped:
        for info in base.infolist():
            data = base.read(info.filename)
            if info.filename == "word/document.xml":
                start = data.index(b"<w:body>") + len(b"<w:body>")
                data = data[:start] + body + data[start:]
            zipped.writestr(info.filename, data)
    return out.getvalue()


def declare_size(data: bytes, member: str, size: int) -> bytes:
    """The zip ``data`` with ``member``'s uncompressed size set to ``size`` in its local header
    and in the central directory, its bytes unchanged: a zip whose directory lies."""
    import struct
    import zipfile

    out = bytearray(data)
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(member)
    struct.pack_into("<I", out, info.header_offset + 22, size)  # local header
    name = member.encode()
    at = out.find(b"PK\x01\x02")
    while at >= 0:  # central directory entries
        (length,) = struct.unpack_from("<H", out, at + 28)
        if out[at + 46 : at + 46 + length] == name:
            struct.pack_into("<I", out, at + 24, size)
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)
