"""Question/answer sets for the retrieval-quality benchmark, and their train/test splits.

A :class:`QASet` is a corpus (``documents``) plus labelled questions, each naming the one
document that answers it. Two real sources give two differently shaped sets:

* ``debian_faq``: the Debian FAQ (package ``debian-faq``). Documents are the FAQ answers keyed
  by their HTML anchor; questions are the FAQ's own questions: full sentences ending in "?",
  often long and conversational, over short-to-medium answers.
* ``python_docs``: the Python 3.11 documentation (package ``python3.11-doc``, the rendered
  HTML of the library reference, the HOWTOs, the tutorial, the language reference and "Using
  Python"). Documents are sections' own text (the section minus its heading and minus its
  subsections, which are documents of their own); the question is the section's heading, a
  short topic phrase such as "Reading and writing compressed files" or "Querying the size of
  a terminal": the terse query a developer types into a search box, over long technical text.
  The heading is not part of the document, so the question is never its first line; about
  one section in nine still opens with the heading's words in a sentence ("Match objects
  always have a boolean value of True"), as technical prose does (:func:`summary` counts them).

  Headings that cannot serve as a query are left out: those with fewer than two natural words
  ("add_help", "ZipFile Objects", "Examples": an API name or a bare generic word names no
  need), headings that occur more than once in the corpus ("Security considerations" in six
  modules: the question would have several right answers) and the Python FAQ pages (already
  questions, the shape of the Debian set). Sections shorter than :data:`MIN_SECTION_CHARS`
  answer nothing; those longer than :data:`MAX_SECTION_CHARS` (whole class references such as
  ``sqlite3.Connection``) are dropped so that no document wins by sheer number of chunks. A
  seeded sample of :data:`PYTHON_DOCS_SIZE` sections is kept, always including the sections
  that the hand-written rephrasings refer to.

Both packages are fetched with ``apt-get download`` and unpacked under ``benchmarks/.cache``
(see :mod:`benchmarks.common`); :class:`DatasetUnavailable` says when that is impossible. The
parsed Python sections are cached there as JSON (the HTML parse takes about 30 s).

Splits, for experiments that learn from some questions (questions attached to documents,
fine-tuned embedders) and test on others:

* :func:`by_document`: test questions are about documents that no training question touches.
* :func:`by_phrasing`: training holds every original question; the test questions are
  hand-written rephrasings (``benchmarks/data/<name>_rephrased.jsonl``) of questions whose
  documents are in training, the case of a support desk whose new tickets ask about the same
  articles in other words.

Every split keeps the whole corpus: only the questions are divided.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.common import CACHE, _extract, faq_pairs

__all__ = [
    "DATA",
    "LOADERS",
    "MAX_SECTION_CHARS",
    "MIN_SECTION_CHARS",
    "PYTHON_DOCS_SIZE",
    "DatasetUnavailable",
    "Doc",
    "QASet",
    "Question",
    "Rephrasing",
    "Section",
    "Split",
    "by_document",
    "by_phrasing",
    "debian_faq",
    "ingest",
    "is_query",
    "load",
    "python_docs",
    "read_rephrasings",
    "read_sections",
    "select_sections",
    "summary",
]

DATA = Path(__file__).resolve().parent / "data"

MIN_SECTION_CHARS = 200
MAX_SECTION_CHARS = 8000
PYTHON_DOCS_SIZE = 300
# Bump when the section parser or its filters change: the JSON cache is keyed by it.
_PARSER_VERSION = 1
# The parts of the Python documentation read for sections (the FAQ is left out on purpose).
_PYTHON_DOC_DIRS = ("library", "howto", "tutorial", "reference", "using")

# fmt: off
_STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "how", "in", "into", "is",
    "it", "its", "of", "on", "or", "other", "the", "to", "using", "via", "what", "when", "with",
    "without", "your",
})
# fmt: on
_NATURAL_WORD = re.compile(r"[A-Za-z][a-z]*(?:['\u2019-][A-Za-z]+)*|[A-Z]{2,}s?")
_SECTION_NUMBER = re.compile(r"^\d+(?:\.\d+)*\.\s+")
# "gzip — Support for gzip files", "email.header: Internationalized headers": the module's
# name is not part of the question.
_MODULE_PREFIX = re.compile(r"^(?:\S+\s+[\u2013\u2014]|\w+(?:\.\w+)+:)\s+")
_BLOCKS = ["p", "li", "dt", "dd", "pre", "div", "tr", "td", "th", "blockquote", "caption"]


class DatasetUnavailable(RuntimeError):
    """The Debian package behind a set cannot be downloaded or unpacked here."""


@dataclass(frozen=True, slots=True)
class Doc:
    """One document of the corpus, as it is upserted into a collection."""

    id: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)

    def as_upsert(self) -> dict[str, Any]:
        """The body of one entry of ``POST /v1/collections/{name}/documents``."""
        return {"id": self.id, "text": self.text, "metadata": self.metadata}


@dataclass(frozen=True, slots=True)
class Question:
    """A question and the id of the one document that answers it."""

    question: str
    document_id: str

    def as_row(self) -> dict[str, str]:
        """A row of ``POST /v1/collections/{name}/evaluate`` (and of ``rag-service eval``)."""
        return {"question": self.question, "document_id": self.document_id}


@dataclass(frozen=True, slots=True)
class Rephrasing:
    """A hand-written new wording of one of a set's questions."""

    document_id: str
    question: str
    rephrased: str


@dataclass(frozen=True, slots=True)
class QASet:
    """A corpus and questions about it; every question's document is in ``documents``."""

    name: str
    documents: list[Doc]
    questions: list[Question]

    def __post_init__(self) -> None:
        ids = [d.id for d in self.documents]
        if len(set(ids)) != len(ids):
            dup = next(i for i, n in Counter(ids).items() if n > 1)
            raise ValueError(f"{self.name}: document id {dup!r} appears twice")
        known = set(ids)
        for q in self.questions:
            if q.document_id not in known:
                raise ValueError(f"{self.name}: question {q.question!r} names no document")

    def document(self, document_id: str) -> Doc:
        for doc in self.documents:
            if doc.id == document_id:
                return doc
        raise KeyError(document_id)


@dataclass(frozen=True, slots=True)
class Section:
    """One section of the Python documentation: its heading and its own text."""

    id: str  # "library/gzip#module-gzip": page and anchor
    page: str
    title: str
    text: str


class Split(NamedTuple):
    """Training and test questions over the same corpus."""

    train: list[Question]
    test: list[Question]


# --- splits ---------------------------------------------------------------------------------


def by_document(qaset: QASet, seed: int = 0, test_fraction: float = 0.3) -> Split:
    """Questions divided by document: a seeded ``test_fraction`` of the documents that have
    questions give all their questions to the test side, the others to training, so no
    document is asked about on both sides."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, not {test_fraction}")
    asked = sorted({q.document_id for q in qaset.questions})
    if len(asked) < 2:
        raise ValueError(f"{qaset.name}: a split needs questions about two documents at least")
    random.Random(seed).shuffle(asked)
    n_test = min(max(1, round(len(asked) * test_fraction)), len(asked) - 1)
    held_out = set(asked[:n_test])
    return Split(
        train=[q for q in qaset.questions if q.document_id not in held_out],
        test=[q for q in qaset.questions if q.document_id in held_out],
    )


def by_phrasing(qaset: QASet, rephrasings: list[Rephrasing] | None = None) -> Split:
    """Training: every original question. Test: the rephrasings (by default those of
    ``benchmarks/data/<name>_rephrased.jsonl``), each about a document that training asks about
    in its original words."""
    rows = read_rephrasings(qaset) if rephrasings is None else rephrasings
    _check_rephrasings(qaset, rows, "rephrasings")
    return Split(
        train=list(qaset.questions),
        test=[Question(r.rephrased, r.document_id) for r in rows],
    )


def read_rephrasings(qaset: QASet, path: Path | None = None) -> list[Rephrasing]:
    """The rephrasings of ``qaset`` from JSONL rows ``{"document_id", "question", "rephrased"}``,
    checked against the set: every ``document_id`` is one of its documents, ``question`` is that
    document's question word for word, and ``rephrased`` says it differently. A bad row raises
    ``ValueError`` naming its file and line."""
    path = path or DATA / f"{qaset.name}_rephrased.jsonl"
    rows: list[Rephrasing] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(value, dict) or set(value) != {"document_id", "question", "rephrased"}:
            raise ValueError(f"{where}: want exactly document_id, question and rephrased")
        if not all(isinstance(v, str) and v.strip() for v in value.values()):
            raise ValueError(f"{where}: every field must be a non-blank string")
        rows.append(Rephrasing(value["document_id"], value["question"], value["rephrased"]))
        _check_rephrasings(qaset, rows[-1:], where)
    if not rows:
        raise ValueError(f"{path.name}: no rows")
    return rows


def _check_rephrasings(qaset: QASet, rows: Iterable[Rephrasing], where: str) -> None:
    asked = {(q.document_id, q.question) for q in qaset.questions}
    ids = {d.id for d in qaset.documents}
    for r in rows:
        if r.document_id not in ids:
            raise ValueError(f"{where}: {qaset.name} has no document {r.document_id!r}")
        if (r.document_id, r.question) not in asked:
            raise ValueError(
                f"{where}: {r.question!r} is not the question of {r.document_id!r} in {qaset.name}"
            )
        if _words(r.rephrased) == _words(r.question):
            raise ValueError(f"{where}: the rephrasing has the words of the original question")


def _words(text: str) -> list[str]:
    return sorted(re.findall(r"\w+", text.lower()))


# --- the sets -------------------------------------------------------------------------------


def _unpacked(run: Callable[[], Any], package: str) -> Any:
    try:
        return run()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DatasetUnavailable(
            f"cannot download or unpack the Debian package {package} "
            f"(apt-get download {package}): {exc}"
        ) from exc


def debian_faq() -> QASet:
    """The Debian FAQ: one document per answer (id = its anchor), its question as the query."""
    pairs = _unpacked(faq_pairs, "debian-faq")
    return QASet(
        name="debian_faq",
        documents=[Doc(anchor, answer, {"source": "debian-faq"}) for anchor, _, answer in pairs],
        questions=[Question(question, anchor) for anchor, question, _ in pairs],
    )


def python_docs(size: int = PYTHON_DOCS_SIZE, seed: int = 0) -> QASet:
    """Python 3.11 documentation sections, their headings as queries: a seeded sample of
    ``size`` sections out of those that pass the filters (module docstring), always holding the
    sections of ``benchmarks/data/python_docs_rephrased.jsonl``."""
    sections = _python_sections()
    by_id = {s.id: s for s in sections}
    pinned = sorted(_rephrased_ids("python_docs") & by_id.keys())
    rest = sorted(by_id.keys() - set(pinned))
    if size < len(pinned) or size > len(sections):
        raise ValueError(
            f"size must be between {len(pinned)} and {len(sections)} sections, not {size}"
        )
    chosen = sorted(pinned + random.Random(seed).sample(rest, size - len(pinned)))
    picked = [by_id[i] for i in chosen]
    return QASet(
        name="python_docs",
        documents=[Doc(s.id, s.text, {"source": "python3.11-doc", "page": s.page}) for s in picked],
        questions=[Question(s.title, s.id) for s in picked],
    )


LOADERS: dict[str, Callable[[], QASet]] = {"debian_faq": debian_faq, "python_docs": python_docs}


def load(name: str) -> QASet:
    """A set by name (a key of :data:`LOADERS`)."""
    if name not in LOADERS:
        raise ValueError(f"no Q/A set {name!r}; there are {', '.join(LOADERS)}")
    return LOADERS[name]()


def summary(qaset: QASet) -> dict[str, Any]:
    """Figures that describe a set's shape, for a benchmark's record."""
    texts = {d.id: d.text for d in qaset.documents}
    q_words = [len(q.question.split()) for q in qaset.questions]
    d_chars = sorted(len(d.text) for d in qaset.documents)
    covered = []
    for q in qaset.questions:
        words = {w for w in re.findall(r"[a-z]+", q.question.lower()) if w not in _STOPWORDS}
        doc_words = set(re.findall(r"[a-z]+", texts[q.document_id].lower()))
        covered.append(len(words & doc_words) / len(words) if words else 0.0)
    return {
        "documents": len(qaset.documents),
        "questions": len(qaset.questions),
        "question_words_mean": round(sum(q_words) / max(len(q_words), 1), 2),
        "questions_ending_in_question_mark": sum(q.question.endswith("?") for q in qaset.questions),
        "document_chars_median": d_chars[len(d_chars) // 2] if d_chars else 0,
        "document_chars_max": d_chars[-1] if d_chars else 0,
        "question_words_in_document_mean": round(sum(covered) / max(len(covered), 1), 3),
        "questions_verbatim_in_first_paragraph": sum(
            q.question.lower() in texts[q.document_id].split("\n", 1)[0].lower()
            for q in qaset.questions
        ),
    }


# --- the Python documentation's sections ----------------------------------------------------


def _rephrased_ids(name: str) -> set[str]:
    path = DATA / f"{name}_rephrased.jsonl"
    if not path.exists():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["document_id"] for line in lines if line.strip()}


def _python_sections() -> list[Section]:
    """Every section of the package that passes :func:`select_sections`, parsed once and cached
    as JSON."""
    cached = CACHE / f"python_docs_sections-v{_PARSER_VERSION}.json"
    if cached.exists():
        return [Section(**row) for row in json.loads(cached.read_text(encoding="utf-8"))]
    root = _unpacked(lambda: _extract("python3.11-doc_*.deb", "python3.11-doc"), "python3.11-doc")
    html = Path(root) / "usr/share/doc/python3.11/html"
    sections = select_sections(s for part in _PYTHON_DOC_DIRS for s in read_sections(html, part))
    cached.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": s.id, "page": s.page, "title": s.title, "text": s.text} for s in sections]
    cached.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return sections


def select_sections(sections: Iterable[Section]) -> list[Section]:
    """The sections whose heading can stand as a query and whose text can answer it: a heading
    of two natural words at least (:func:`is_query`) found once only, a text of
    :data:`MIN_SECTION_CHARS` to :data:`MAX_SECTION_CHARS` characters."""
    found = list(sections)
    titles = Counter(s.title.lower() for s in found)
    return [
        s
        for s in found
        if titles[s.title.lower()] == 1
        and MIN_SECTION_CHARS <= len(s.text) <= MAX_SECTION_CHARS
        and is_query(s.title)
    ]


def is_query(title: str) -> bool:
    """Whether a heading names a need: two natural words at least, not counting stop words and
    API names (``add_help``, ``ZipFile``, ``os.path``)."""
    words = [w.strip(",:;()?!\"'\u201c\u201d") for w in title.split()]
    natural = [w for w in words if _NATURAL_WORD.fullmatch(w) and w.lower() not in _STOPWORDS]
    return len(natural) >= 2


def read_sections(html: Path, part: str) -> Iterator[Section]:
    """Every ``<section>`` of the Sphinx HTML pages in ``html/part``, in page order, each with
    its own text only: without its heading, its subsections and its table of contents."""
    from bs4 import BeautifulSoup, Comment, Tag

    for page in sorted((html / part).glob("*.html")):
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        body = soup.find("div", class_="body")
        if not isinstance(body, Tag):
            continue
        page_id = f"{part}/{page.stem}"
        for link in body.find_all("a", class_="headerlink"):  # the "¶" permalinks
            link.decompose()
        # Inline markup joins without a gap ("gzip.open(filename, mode)"), blocks with one.
        for block in body.find_all(_BLOCKS):
            block.append("\n")
        for section in body.find_all("section"):
            heading = section.find(["h1", "h2", "h3", "h4", "h5", "h6"], recursive=False)
            if not isinstance(heading, Tag) or not section.get("id"):
                continue
            title = " ".join(heading.get_text().split())
            title = _SECTION_NUMBER.sub("", _MODULE_PREFIX.sub("", title))
            blocks = []
            for child in section.children:
                if child is heading or isinstance(child, Comment):
                    continue
                if isinstance(child, Tag):
                    if child.name == "section" or "toctree-wrapper" in (child.get("class") or []):
                        continue
                    text = child.get_text()
                else:
                    text = str(child)
                text = " ".join(text.split())
                if text:
                    blocks.append(text)
            yield Section(f"{page_id}#{section['id']}", page_id, title, "\n".join(blocks))


def ingest(client: Any, collection: str, qaset: QASet) -> None:
    """Upsert a question set's documents into ``collection`` through the service (an
    ``httpx.Client`` on its URL), 64 per request."""
    docs = [d.as_upsert() for d in qaset.documents]
    for i in range(0, len(docs), 64):
        client.post(
            f"/v1/collections/{collection}/documents", json={"documents": docs[i : i + 64]}
        ).raise_for_status()
