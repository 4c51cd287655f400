"""Files to documents: PDF, Word (.docx), HTML, Markdown, reStructuredText, plain text, JSONL.

Used by ``rag-service ingest`` (:func:`discover` + :func:`load`) and by the upload endpoint
(:func:`load_bytes`, which works on bytes and a client's file name). The suffix of the file
name, case-insensitively, picks the loader; every loader returns the document text plus what
it knows about the structure, in ``metadata``:

* all: ``source`` (the document id given), ``content_type`` (:data:`CONTENT_TYPES`) and
  ``title`` when one is known. No key is ever an empty string; unknown keys are left out.
* ``pages`` and ``page_starts`` (PDF): page ``i + 1``'s text begins at ``page_starts[i]``
  in the text. Pages are joined with a blank line; a page without text adds nothing and gets
  the offset where the text so far ends, so the list is non-decreasing, has one entry per
  page, and ``bisect_right(page_starts, offset)`` gives a chunk's page.
* ``sections`` (Markdown, reST, HTML, Word): ``[offset, heading]`` pairs in ascending order.
  For Markdown and reST the text is kept byte for byte and ``offset`` is where the heading's
  line begins (for an overlined reST title: the title line, not the overline). For HTML and
  Word the text is rebuilt and each heading is one line of it, so ``text[offset:]`` starts
  with ``heading``.

Ids come from paths relative to the folder given (prefixed with its name), so re-ingesting the
same tree updates documents instead of duplicating them. A .jsonl file holds one document per
line: ``{"text": ..., "id"?: ..., "metadata"?: {...}}``; lines without an id get
``<doc_id>#<line>``, blank lines and lines with blank text are skipped.

Every failure is a :class:`LoadError` whose ``kind`` says what went wrong and whose message
names the file: a parser library's own exception never escapes (it becomes kind ``parse``).
PDFs are read with PDFium (pypdfium2), one at a time per process (PDFium is not thread-safe).
"""

from __future__ import annotations

import codecs
import io
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from rag_service import bounded_json
from rag_service.ids import id_problem

if TYPE_CHECKING:
    from bs4 import Tag

__all__ = [
    "CONTENT_TYPES",
    "SUFFIXES",
    "LoadError",
    "LoadErrorKind",
    "LoadLimits",
    "SourceDocument",
    "discover",
    "load",
    "load_bytes",
    "read_file",
]

CONTENT_TYPES: dict[str, str] = {
    ".pdf": "application/pdf",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".html": "text/html",
    ".htm": "text/html",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".rst": "text/x-rst",
    ".txt": "text/plain",
    ".jsonl": "application/jsonl",
}
SUFFIXES: tuple[str, ...] = tuple(CONTENT_TYPES)

LoadErrorKind = Literal[
    "unsupported", "empty", "parse", "no_text_layer", "encrypted", "unreadable", "bad_id", "limit"
]

_MAX_REASON = 200  # characters of a library's error message kept in ours


@dataclass(frozen=True, slots=True)
class LoadLimits:
    """Bounds on the work one file may cause, checked before the parser meets what they
    bound (each refusal is a :class:`LoadError` of kind ``limit`` naming the setting):

    * ``unzipped_bytes``, ``zip_entries``: a Word document's zip, from its directory before
      anything is inflated (``zipfile`` then inflates no member past the size its directory
      gives: a member that holds more fails its CRC check);
    * ``elements``: paragraphs of a Word document, elements of an HTML page (counted in the
      raw markup before a parser builds anything);
    * ``html_depth``: how deep HTML elements nest, as the HTML parser would nest them.

    Markdown needs no bound here: only its block structure is parsed (headings), which
    markdown-it does in linear time; inline markup, where emphasis matching can go
    quadratic, is never parsed.
    """

    unzipped_bytes: int = 256 * 1024 * 1024
    zip_entries: int = 10_000
    elements: int = 200_000
    html_depth: int = 256


class LoadError(ValueError):
    """A file could not be turned into documents. ``str(error)`` is ``"<filename>: <reason>"``.

    ``kind``: ``unsupported`` (file type), ``empty`` (no bytes, no text, no documents),
    ``parse`` (corrupt, truncated or not UTF-8), ``no_text_layer`` (a PDF without text, e.g. a
    scan), ``encrypted`` (a PDF that needs a password), ``bad_id`` (a JSONL line's id breaks
    the id rule of :mod:`rag_service.ids`), ``limit`` (past a bound of :class:`LoadLimits`:
    the message names it); ``unreadable`` only comes from :func:`discover` and :func:`load`
    (a path that is missing or cannot be read).
    """

    def __init__(self, filename: str, reason: str, *, kind: LoadErrorKind = "parse") -> None:
        super().__init__(f"{filename}: {reason}")
        self.filename = filename
        self.reason = reason
        self.kind: LoadErrorKind = kind

    def __reduce__(self) -> tuple[Any, ...]:  # crosses from a loader process (pickle)
        return (_load_error, (self.filename, self.reason, self.kind))


def _load_error(filename: str, reason: str, kind: LoadErrorKind) -> LoadError:
    return LoadError(filename, reason, kind=kind)


@dataclass(slots=True)
class SourceDocument:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def discover(paths: list[Path], prefix: str | None = None) -> Iterator[tuple[Path, str]]:
    """(file, document id) for every supported file under ``paths``, in a stable order: a
    folder's files get ``<prefix>/<path inside it>`` (``prefix`` defaults to the folder's
    name), a file given alone its name."""
    for root in paths:
        if root.is_dir():
            base = root.resolve()
            for path in sorted(base.rglob("*")):
                if path.is_file() and path.suffix.lower() in SUFFIXES:
                    yield path, f"{prefix or base.name}/{path.relative_to(base).as_posix()}"
        elif root.is_file():
            yield root, root.name
        else:
            raise LoadError(str(root), "no such file or directory", kind="unreadable")


def read_file(path: Path) -> bytes:
    """The bytes of the file at ``path``; :class:`LoadError` (``unreadable``) if it cannot be
    read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = f"cannot read ({exc.strerror or exc})"
        raise LoadError(path.name, reason, kind="unreadable") from exc


def load(path: Path, doc_id: str, limits: LoadLimits | None = None) -> list[SourceDocument]:
    """The documents in the file at ``path`` (see :func:`load_bytes`)."""
    return load_bytes(read_file(path), path.name, doc_id, limits)


def load_bytes(
    data: bytes, filename: str, doc_id: str, limits: LoadLimits | None = None
) -> list[SourceDocument]:
    """The documents in ``data``, a file called ``filename`` (its suffix picks the loader):
    one document with id ``doc_id``, or one per line for JSONL. Raises :class:`LoadError`
    (kind ``limit`` past one of ``limits``, default :class:`LoadLimits`'s)."""
    limits = limits or LoadLimits()
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in CONTENT_TYPES:
        found = f"'{suffix}'" if suffix else "without a suffix"
        raise LoadError(
            filename,
            f"unsupported file type {found} (supported: {', '.join(SUFFIXES)})",
            kind="unsupported",
        )
    if not data:
        raise LoadError(filename, "empty file", kind="empty")
    content_type = CONTENT_TYPES[suffix]
    if suffix == ".jsonl":
        docs = list(_jsonl(_decode(data, filename), filename, doc_id, content_type))
        if not docs:
            raise LoadError(filename, "no documents (only blank lines or texts)", kind="empty")
        return docs
    parse, label = _PARSERS[suffix]
    try:
        text, found_meta = parse(data, filename, limits)
    except (LoadError, MemoryError):
        raise
    except Exception as exc:  # a parser library's error, whatever its type, is a parse error
        raise LoadError(filename, f"not a readable {label} ({_reason(exc)})") from exc
    if not text.strip():
        raise LoadError(filename, "no text", kind="empty")
    metadata: dict[str, Any] = {"source": doc_id, "content_type": content_type}
    metadata.update((k, v) for k, v in found_meta.items() if v not in (None, "", []))
    return [SourceDocument(doc_id, text, metadata)]


# --- shared helpers ---------------------------------------------------------------------------

Meta = dict[str, Any]
Sections = list[list[Any]]  # [[offset, heading], ...]


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _decode(data: bytes, filename: str) -> str:
    """UTF-8 (a BOM is dropped); UTF-16 only when a BOM says so. NUL bytes mean binary data."""
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            text = data.decode("utf-16")
        else:
            text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoadError(filename, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if "\x00" in text:
        raise LoadError(filename, "not UTF-8 text (binary data: NUL bytes)")
    return text


def _clean(text: str) -> str:
    """Extracted text made storable: no NUL characters, no lone surrogates."""
    text = text.replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _line_starts(text: str) -> list[int]:
    """Offset of each line; line breaks are LF, CRLF or CR (as markdown-it counts them)."""
    return [0, *(m.end() for m in re.finditer(r"\r\n?|\n", text))]


def _title_from(sections: Sections, levels: list[int], *, any_level: bool = True) -> str | None:
    """The first level-1 heading, else (when ``any_level``) the first heading."""
    for (_, heading), level in zip(sections, levels, strict=True):
        if level == 1:
            return str(heading)
    return str(sections[0][1]) if sections and any_level else None


# --- plain text, JSONL ------------------------------------------------------------------------


def _plain(data: bytes, filename: str, limits: LoadLimits) -> tuple[str, Meta]:
    return _decode(data, filename), {}


def _jsonl(raw: str, filename: str, doc_id: str, content_type: str) -> Iterator[SourceDocument]:
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = bounded_json.loads(line)
        except bounded_json.JsonBoundsError as exc:
            raise LoadError(f"{filename}:{lineno}", str(exc)) from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise LoadError(f"{filename}:{lineno}", "expected an object with a string 'text'")
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise LoadError(f"{filename}:{lineno}", "'metadata' must be an object")
        given = obj.get("id")
        if given is not None and not isinstance(given, str | int):
            raise LoadError(f"{filename}:{lineno}", "'id' must be a string")
        line_id = str(given) if given not in (None, "") else f"{doc_id}#{lineno}"
        if (problem := id_problem(line_id)) is not None:
            raise LoadError(
                f"{filename}:{lineno}",
                f"{line_id[:80]!r} cannot be a document id: {problem}",
                kind="bad_id",
            )
        if obj["text"].strip():
            yield SourceDocument(
                line_id,
                obj["text"],
                {"source": doc_id, "content_type": content_type, **metadata},
            )


# --- PDF --------------------------------------------------------------------------------------


# PDFium is not thread-safe: one document at a time in this process (a 70-page manual takes
# well under a second, so uploads queue here only briefly).
_PDFIUM = threading.Lock()
# Control characters PDFium leaves in extracted text (U+0002 marks a hyphen at a line break,
# U+FFFE a soft hyphen); line breaks come as "\r\n".
_PDF_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _pdf(data: bytes, filename: str, limits: LoadLimits) -> tuple[str, Meta]:
    """The text layer page by page, with PDFium (pypdfium2: Chromium's PDF engine), which keeps
    the spaces between words that many PDFs draw as positioning only (pypdf ran the words of
    the Debian FAQ's PDF together: "DebianGNU/Linuxincludescompletesource-code")."""
    import pypdfium2 as pdfium

    with _PDFIUM:
        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            if "password" in str(exc).lower():
                raise LoadError(filename, "encrypted, needs a password", kind="encrypted") from exc
            raise LoadError(filename, f"not a readable PDF ({_reason(exc)})") from exc
        try:
            texts: list[str] = []
            for number in range(1, len(pdf) + 1):
                try:
                    page = pdf[number - 1]
                    textpage = page.get_textpage()
                    texts.append(textpage.get_text_range())
                    textpage.close()
                    page.close()
                except Exception as exc:
                    raise LoadError(
                        filename, f"cannot read page {number} ({_reason(exc)})"
                    ) from exc
            title = _pdf_title(pdf)
        finally:
            pdf.close()
    parts: list[str] = []
    page_starts: list[int] = []
    length = 0
    for raw in texts:
        page_text = _PDF_CONTROL.sub("", _clean(raw).replace("\r\n", "\n").replace("\r", "\n"))
        page_text = page_text.strip()
        if page_text and parts:
            length += 2  # the "\n\n" before this page
        page_starts.append(length)
        if page_text:
            parts.append(page_text)
            length += len(page_text)
    if not page_starts:
        raise LoadError(filename, "no pages", kind="empty")
    if not parts:
        raise LoadError(filename, "no text layer, needs OCR", kind="no_text_layer")
    return "\n\n".join(parts), {
        "pages": len(page_starts),
        "page_starts": page_starts,
        "title": title,
    }


def _pdf_title(pdf: Any) -> str | None:
    """/Title from the document information; a damaged dictionary just means no title."""
    try:
        title = pdf.get_metadata_dict().get("Title")
    except Exception:
        return None
    return _one_line(_clean(title)) or None if isinstance(title, str) else None


# --- Word -------------------------------------------------------------------------------------

_DOCX_HEADING = re.compile(r"heading ([1-9])|title", re.IGNORECASE)


def _docx_blocks(element: Any, parent: Any) -> Iterator[Any]:
    """Paragraphs and tables in document order, including those inside content controls."""
    from docx.oxml.ns import qn
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    for child in element.iterchildren():
        if child.tag == qn("w:p"):
            yield Paragraph(child, parent)
        elif child.tag == qn("w:tbl"):
            yield Table(child, parent)
        elif child.tag == qn("w:sdt"):
            content = child.find(qn("w:sdtContent"))
            if content is not None:
                yield from _docx_blocks(content, parent)


def _docx_table_lines(table: Any) -> Iterator[str]:
    """One line per row, cells joined with `` | `` (a merged cell counted once)."""
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:
            if cell._tc is previous:
                continue
            previous = cell._tc
            if text := _one_line(_clean(cell.text)):
                cells.append(text)
        if cells:
            yield " | ".join(cells)


_WORD_PARAGRAPH = re.compile(rb"<w:p[\s/>]")


def _check_zip(data: bytes, filename: str, limits: LoadLimits) -> None:
    """The zip's directory within the limits, and its main part's paragraphs too, before
    anything is parsed (a 1 MB upload can inflate to gigabytes, or hold millions of empty
    paragraphs)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise LoadError(filename, f"not a readable Word document ({_reason(exc)})") from exc
    with archive:
        entries = archive.infolist()
        if len(entries) > limits.zip_entries:
            raise LoadError(
                filename,
                f"the zip holds {len(entries)} entries; the limit is {limits.zip_entries} "
                "(RAG_MAX_ZIP_ENTRIES)",
                kind="limit",
            )
        total = sum(e.file_size for e in entries)
        if total > limits.unzipped_bytes:
            raise LoadError(
                filename,
                f"the zip inflates to {total} bytes; the limit is {limits.unzipped_bytes} "
                "(RAG_MAX_UNZIPPED_BYTES)",
                kind="limit",
            )
        names = {e.filename for e in entries}
        if "word/document.xml" in names:
            paragraphs = len(_WORD_PARAGRAPH.findall(archive.read("word/document.xml")))
            if paragraphs > limits.elements:
                raise LoadError(
                    filename,
                    f"{paragraphs} paragraphs; the limit is {limits.elements} "
                    "(RAG_MAX_DOCUMENT_ELEMENTS)",
                    kind="limit",
                )


def _docx(data: bytes, filename: str, limits: LoadLimits) -> tuple[str, Meta]:
    from docx import Document
    from docx.text.paragraph import Paragraph

    _check_zip(data, filename, limits)
    doc = Document(io.BytesIO(data))
    lines: list[str] = []
    sections: Sections = []
    levels: list[int] = []
    offset = 0
    for block in _docx_blocks(doc.element.body, doc._body):
        if isinstance(block, Paragraph):
            text = _clean(block.text).strip()
            if not text:
                continue
            style = block.style.name if block.style is not None else None
            heading = _DOCX_HEADING.fullmatch(style or "")
            if heading:
                text = _one_line(text)  # a heading is one line of the text
                sections.append([offset, text])
                levels.append(int(heading.group(1) or 1))  # Title ranks with Heading 1
            new = [text]
        else:
            new = list(_docx_table_lines(block))
        for line in new:
            lines.append(line)
            offset += len(line) + 1
    title = _one_line(_clean(doc.core_properties.title or "")) or _title_from(
        sections, levels, any_level=False
    )
    return "\n".join(lines), {"title": title, "sections": sections}


# --- HTML -------------------------------------------------------------------------------------

_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_NEVER_TEXT = {"script", "style", "noscript", "template", "svg", "head", "title", "iframe"}
_BOILERPLATE = {"nav", "aside", "footer"}
_BOILERPLATE_ROLES = {"navigation", "banner", "contentinfo", "complementary"}
_SECTIONING = {"article", "aside", "main", "nav", "section"}
_BLOCKS = {
    "address", "article", "aside", "blockquote", "body", "caption", "center", "dd", "details",
    "dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header",
    "hgroup", "hr", "html", "legend", "li", "main", "menu", "nav", "ol", "p", "pre", "section",
    "summary", "table", "tbody", "tfoot", "thead", "tr", "ul",
}  # fmt: skip


def _hidden(tag: Tag, in_section: bool = False) -> bool:
    return (
        tag.name in _NEVER_TEXT
        or tag.has_attr("hidden")
        or str(tag.get("aria-hidden", "")).lower() == "true"
    )


def _boilerplate(tag: Tag, in_section: bool) -> bool:
    """Navigation, page header and footer, sidebars, forms around no content. ``in_section``:
    whether a sectioning element holds ``tag`` (the walk keeps count, so nested headers cost
    no walk up the tree each: that was quadratic in the nesting)."""
    if _hidden(tag) or tag.name in _BOILERPLATE:
        return True
    if str(tag.get("role", "")).lower() in _BOILERPLATE_ROLES:
        return True
    if tag.name == "header":  # the page's banner; an article's own header is content
        return not in_section
    if tag.name == "form":  # some sites wrap the whole page in one form
        return tag.find(["main", "article", "h1", "h2"]) is None
    return False


class _HtmlText:
    """Text of an element tree: one line per block, inline text joined, whitespace collapsed
    (``<pre>`` keeps its lines and indentation), table cells joined with `` | ``; each
    heading becomes exactly one line, recorded with its offset in :attr:`sections`."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.sections: Sections = []
        self.levels: list[int] = []
        self._length = 0
        self._buffer: list[str] = []

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def walk(self, root: Tag, skip: Callable[[Tag, bool], bool]) -> _HtmlText:
        from bs4 import CData, NavigableString, Tag

        stack: list[tuple[Any, bool]] = [(root, True)]
        heading = pre = 0  # depths
        sectioning = int(root.name in _SECTIONING or root.find_parent(_SECTIONING) is not None)
        while stack:
            node, entering = stack.pop()
            if isinstance(node, Tag):
                name = node.name
                if entering:
                    if node is not root and skip(node, sectioning > 0):
                        continue
                    if name == "br":
                        self._buffer.append("\n")
                        continue
                    if name in ("td", "th") and node.find_previous_sibling(["td", "th"]):
                        self._buffer.append(" | ")
                    if not heading and (name in _BLOCKS or name in _HEADINGS):
                        self._flush(pre=pre > 0)
                    heading += name in _HEADINGS
                    pre += name == "pre"
                    sectioning += node is not root and name in _SECTIONING
                    stack.append((node, False))
                    stack.extend((child, True) for child in reversed(node.contents))
                else:
                    if name in _HEADINGS:
                        heading -= 1
                        if not heading:
                            self._flush(level=int(name[1]))
                    elif not heading and name in _BLOCKS:
                        self._flush(pre=pre > 0)
                    pre -= name == "pre"
                    sectioning -= node is not root and name in _SECTIONING
            elif type(node) is NavigableString or isinstance(node, CData):
                self._buffer.append(str(node) if pre else re.sub(r"\s+", " ", str(node)))
        self._flush(pre=False)
        return self

    def _flush(self, *, pre: bool = False, level: int = 0) -> None:
        raw = "".join(self._buffer)
        self._buffer.clear()
        if pre:
            lines = [line.rstrip() for line in raw.split("\n") if line.strip()]
        else:
            lines = [line for line in map(_one_line, raw.split("\n")) if line]
        if level and lines:
            lines = [" ".join(lines)]
            self.sections.append([self._length, lines[0]])
            self.levels.append(level)
        for line in lines:
            self.lines.append(line)
            self._length += len(line) + 1


_VOID = {
    "area", "base", "basefont", "br", "col", "command", "embed", "frame", "hr", "img", "input",
    "isindex", "keygen", "link", "meta", "param", "source", "spacer", "track", "wbr",
}  # fmt: skip
_TAG = re.compile(r"<(/?)([A-Za-z][^\s/>]*)|<!--")


def _check_html(markup: str, filename: str, limits: LoadLimits) -> None:
    """Elements and nesting within the limits, from a scan of the tags that nests them the
    way the parser does (an end tag closes up to its open element; an unclosed ``<p>``
    stays open), before the parser builds its tree: bs4 takes seconds per 100,000 elements,
    and a million nested ones took 46 s and 600 MB. The scan only moves forward (each
    ``str.find`` starts where the last one ended), so it is linear in the markup."""
    open_tags: list[str] = []
    counts: dict[str, int] = {}
    elements = pos = 0
    next_gt = -1  # where the next ">" is, once looked for
    while (match := _TAG.search(markup, pos)) is not None:
        pos = match.end()
        closing, name = match.groups()
        if name is None:  # a comment: skip to its end
            end = markup.find("-->", pos)
            if end < 0:
                return
            pos = end + 3
            continue
        if next_gt < pos:
            next_gt = markup.find(">", pos)
            if next_gt < 0:
                return  # no tag ends after here
        name = name.lower()
        if closing:
            if counts.get(name):
                while open_tags:
                    top = open_tags.pop()
                    counts[top] -= 1
                    if top == name:
                        break
            continue
        elements += 1
        if elements > limits.elements:
            raise LoadError(
                filename,
                f"more than {limits.elements} HTML elements (RAG_MAX_DOCUMENT_ELEMENTS)",
                kind="limit",
            )
        if name in _VOID or markup[next_gt - 1] == "/":
            continue
        open_tags.append(name)
        counts[name] = counts.get(name, 0) + 1
        if len(open_tags) > limits.html_depth:
            raise LoadError(
                filename,
                f"HTML elements nest more than {limits.html_depth} deep (RAG_MAX_HTML_DEPTH)",
                kind="limit",
            )


def _html(data: bytes, filename: str, limits: LoadLimits) -> tuple[str, Meta]:
    from bs4 import BeautifulSoup

    markup = _decode(data, filename)
    _check_html(markup, filename, limits)
    soup = BeautifulSoup(markup, "html.parser")
    body = soup.body or soup
    root = body.find("main") or body.find(role="main")
    if root is None and (articles := body.find_all("article")):
        root = max(articles, key=lambda a: len(a.get_text()))
    built = _HtmlText().walk(root or body, _boilerplate)
    if not built.text.strip():  # everything looked like boilerplate: keep all visible text
        built = _HtmlText().walk(body, _hidden)
    title_tag = soup.find("title")
    title = _one_line(title_tag.get_text()) if title_tag is not None else ""
    if not title:
        title = _title_from(built.sections, built.levels, any_level=False) or ""
    if not title and (h1 := soup.find("h1")) is not None:
        title = _one_line(h1.get_text())
    return built.text, {"title": title or None, "sections": built.sections}


# --- Markdown ---------------------------------------------------------------------------------

_FRONT_MATTER_END = re.compile(r"(?:---|\.\.\.)\s*")
_FRONT_MATTER_TITLE = re.compile(r"title:\s*(.*?)\s*")


def _front_matter(lines: list[str]) -> tuple[int, str | None]:
    """(number of lines of a leading YAML front matter block, its ``title:``)."""
    if not lines or lines[0].rstrip() != "---":
        return 0, None
    for end in range(1, len(lines)):
        if _FRONT_MATTER_END.fullmatch(lines[end]):
            title = None
            for line in lines[1:end]:
                if m := _FRONT_MATTER_TITLE.fullmatch(line):
                    value = m.group(1)
                    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                        value = value[1:-1]
                    title = _one_line(value) or None
                    break
            return end + 1, title
    return 0, None


def _markdown(data: bytes, filename: str, limits: LoadLimits) -> tuple[str, Meta]:
    from markdown_it import MarkdownIt

    text = _decode(data, filename)
    starts = _line_starts(text)
    lines = re.split(r"\r\n?|\n", text)
    skipped, title = _front_matter(lines)
    # The front matter's lines become blank, so markdown-it's line numbers stay the file's.
    source = "\n" * skipped + "\n".join(lines[skipped:])
    # Block structure only: the headings' text is the inline token's source, and inline
    # parsing (emphasis matching went quadratic on "*a **a " * 200000) is never needed.
    tokens = MarkdownIt("commonmark").disable("inline").parse(source)
    sections: Sections = []
    levels: list[int] = []
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and token.map and i + 1 < len(tokens):
            heading = _one_line(tokens[i + 1].content)
            if heading:
                sections.append([starts[token.map[0]], heading])
                levels.append(int(token.tag[1]))
    return text, {"title": title or _title_from(sections, levels), "sections": sections}


# --- reStructuredText -------------------------------------------------------------------------

_RST_ADORNMENT = re.compile(r"""([=\-`:'"~^_*+#<>])\1+[ \t]*""")


def _rst(data: bytes, filename: str, limits: LoadLimits) -> tuple[str, Meta]:
    """Section titles: a line underlined (and optionally overlined, with the same line) by
    one repeated punctuation character, at least as long as the title, after a blank line."""
    text = _decode(data, filename)
    starts = _line_starts(text)
    lines = re.split(r"\r\n?|\n", text)
    sections: Sections = []
    i, after_title = 0, -1
    while i < len(lines):
        line = lines[i].rstrip()
        fresh = i == 0 or not lines[i - 1].strip() or i == after_title
        adornment = _RST_ADORNMENT.fullmatch(line) is not None
        if fresh and adornment and i + 2 < len(lines):
            title, under = lines[i + 1].rstrip(), lines[i + 2].rstrip()
            if (
                title.strip()
                and not _RST_ADORNMENT.fullmatch(title)
                and under == line
                and len(line) >= len(title)
            ):
                sections.append([starts[i + 1], title.strip()])
                i = after_title = i + 3
                continue
        if fresh and not adornment and line and not line[0].isspace() and i + 1 < len(lines):
            under = lines[i + 1].rstrip()
            if _RST_ADORNMENT.fullmatch(under) and len(under) >= len(line):
                sections.append([starts[i], line])
                i = after_title = i + 2
                continue
        i += 1
    return text, {"title": sections[0][1] if sections else None, "sections": sections}


_PARSERS: dict[str, tuple[Callable[[bytes, str, LoadLimits], tuple[str, Meta]], str]] = {
    ".pdf": (_pdf, "PDF"),
    ".docx": (_docx, "Word document"),
    ".html": (_html, "HTML document"),
    ".htm": (_html, "HTML document"),
    ".md": (_markdown, "Markdown document"),
    ".markdown": (_markdown, "Markdown document"),
    ".rst": (_rst, "reStructuredText document"),
    ".txt": (_plain, "text file"),
}
