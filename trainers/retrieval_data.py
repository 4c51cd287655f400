"""Training pairs for retrievers: (query, positive passage, relevant documents).

Where pairs come from:

* labelled questions, a JSONL of ``{"question", "document_id"}``, ``{"question",
  "document_ids"}`` or ``{"question", "answer"}`` (the row shape of the service's evaluate
  endpoint and ``rag-service eval``); ids are resolved against a corpus, an answer text is
  matched (normalised) to the one document that holds it;
* chat data, the JSONL ``{"messages": [...]}`` that ``rag-train lora`` takes: every user turn
  followed by an assistant turn gives (user turn -> that answer); each distinct answer becomes
  a passage of its own (id ``chat:<hash>``);
* a corpus with no labels: pseudo-queries. Headings (Markdown ``#`` and setext, reST
  underlined titles) and a document's ``metadata["title"]`` point at their section; a heading
  found in several documents says nothing about which one is meant and is dropped. With a
  question writer, the service's ``/v1/chat/completions`` (retrieval off) writes one question
  per passage; a reply that is not a single question in the writer's own words is refused.

The corpus is a local JSONL of ``{"id", "text", "metadata"?}`` or a collection of a running
service, read over HTTP. Every bad input line is an error naming the file and line number;
nothing trains on a partly read file.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rag_service.evaluation import match_answers, normalise
from rag_service.jsonl import json_lines
from trainers.data import check_example

__all__ = [
    "DataError",
    "Document",
    "Pair",
    "Passage",
    "Section",
    "chat_pairs",
    "check_question",
    "chunk_documents",
    "fetch_collection",
    "heading_pairs",
    "qa_pairs",
    "read_corpus_file",
    "sections",
    "strip_headings",
    "write_questions",
]

OffsetsFn = Callable[[list[str]], list[list[tuple[int, int]]]]


class DataError(ValueError):
    """Input that cannot be trained on; ``problems`` holds one ``file:line: why`` each."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        shown = "".join(f"\n  {p}" for p in self.problems[:10])
        more = f"\n  ... and {len(self.problems) - 10} more" if len(self.problems) > 10 else ""
        super().__init__(message + shown + more)


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Passage:
    """One retrieval unit: a chunk of a document (or a whole chat answer)."""

    document_id: str
    text: str


@dataclass(frozen=True, slots=True)
class Pair:
    """A query and what answers it.

    ``positive`` is the passage to train towards; None means "the best passage of the
    relevant documents", chosen with the base model once the corpus is chunked. ``answer``
    (labelled rows with an answer text) prefers the passage that holds it.
    """

    query: str
    relevant: frozenset[str]
    positive: str | None
    source: str  # qa | chat | heading | title | generated
    origin: str  # file:line, or document id
    answer: str | None = None


def _load_json_lines(path: Path) -> list[tuple[int, Any, str | None]]:
    """(line number, parsed value or None, why it is not JSON or None)."""
    try:
        return list(json_lines(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc


def _raise(path: Path, problems: list[str], what: str) -> None:
    if problems:
        raise DataError(f"{path}: {len(problems)} bad {what}", problems)


# --- corpus ------------------------------------------------------------------------------


def read_corpus_file(path: Path) -> list[Document]:
    """Documents from a JSONL of ``{"id", "text", "metadata"?}``; ids must be unique."""
    docs: list[Document] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    for lineno, value, bad in _load_json_lines(path):
        where = f"{path}:{lineno}"
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        if not isinstance(value, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        doc_id, text, metadata = value.get("id"), value.get("text"), value.get("metadata", {})
        if not isinstance(doc_id, str) or not doc_id:
            problems.append(f'{where}: "id" must be a non-empty string')
        elif not isinstance(text, str) or not text.strip():
            problems.append(f'{where}: "text" must be a non-blank string')
        elif not isinstance(metadata, dict):
            problems.append(f'{where}: "metadata" must be an object')
        elif doc_id in seen:
            problems.append(f"{where}: duplicate id {doc_id!r} (first on line {seen[doc_id]})")
        else:
            seen[doc_id] = lineno
            docs.append(Document(doc_id, text, metadata))
    _raise(path, problems, "corpus lines")
    if not docs:
        raise DataError(f"{path}: no documents")
    return docs


def fetch_collection(client: Any, name: str, *, page_size: int = 100) -> list[Document]:
    """Every document of collection ``name`` from a running service.

    ``client`` is an ``httpx.Client`` with the service's base URL (and key) set: the list
    endpoint is paged with ``limit``/``after``, then each document's text is read.
    """
    import httpx

    base = f"/v1/collections/{quote(name, safe='')}/documents"

    def get(path: str, params: dict[str, Any] | None = None) -> Any:
        try:
            resp = client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise DataError(f"cannot reach the service at {client.base_url}: {exc}") from exc
        if resp.status_code != 200:
            try:
                why = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                why = resp.text[:300]
            raise DataError(f"collection {name!r}: GET {path} answered {resp.status_code}: {why}")
        return resp.json()

    ids: list[str] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": page_size}
        if after is not None:
            params["after"] = after
        page = get(base, params)
        ids += [d["id"] for d in page["data"]]
        if not page.get("has_more") or not page["data"]:
            break
        after = page["last_id"]
    docs = []
    for doc_id in ids:
        body = get(f"{base}/{quote(doc_id, safe='')}")
        docs.append(Document(doc_id, body.get("text") or "", body.get("metadata") or {}))
    if not docs:
        raise DataError(f"collection {name!r} has no documents")
    return docs


# --- labelled questions ------------------------------------------------------------------

_TARGETS = ("document_id", "document_ids", "answer")


def _qa_row(value: Any, known: set[str]) -> tuple[str, list[str] | None, str | None, str]:
    """(question, document ids or None, answer or None, why refused or "")."""
    if not isinstance(value, dict):
        return "", None, None, "not a JSON object"
    question = value.get("question")
    if not isinstance(question, str) or not question.strip():
        return "", None, None, '"question" must be a non-blank string'
    given = [k for k in _TARGETS if value.get(k) is not None]
    if len(given) != 1:
        return "", None, None, 'give exactly one of "document_id", "document_ids" or "answer"'
    target = value[given[0]]
    if given[0] == "answer":
        if not isinstance(target, str) or not target.strip():
            return "", None, None, '"answer" must be a non-blank string'
        return question.strip(), None, target, ""
    ids = [target] if given[0] == "document_id" else target
    if not isinstance(ids, list) or not ids or not all(isinstance(d, str) and d for d in ids):
        return "", None, None, f'"{given[0]}" must be a non-empty string or list of strings'
    unknown = [d for d in ids if d not in known]
    if unknown:
        return "", None, None, f"no such document in the corpus: {', '.join(unknown[:3])}"
    return question.strip(), ids, None, ""


def qa_pairs(path: Path, corpus: Sequence[Document]) -> list[Pair]:
    """Pairs from labelled questions; every id or answer must resolve in ``corpus``."""
    known = {d.id for d in corpus}
    problems: list[str] = []
    rows: list[tuple[int, str, list[str] | None, str | None]] = []
    for lineno, value, bad in _load_json_lines(path):
        if bad:
            problems.append(f"{path}:{lineno}: {bad}")
            continue
        question, ids, answer, why = _qa_row(value, known)
        if why:
            problems.append(f"{path}:{lineno}: {why}")
        else:
            rows.append((lineno, question, ids, answer))
    answers = {i: a for i, (_, _, _, a) in enumerate(rows) if a is not None}
    matched = match_answers(answers, ((d.id, d.text) for d in corpus)) if answers else {}
    pairs = []
    for i, (lineno, question, ids, answer) in enumerate(rows):
        if answer is not None:
            found = matched[i]
            if not found:
                problems.append(f"{path}:{lineno}: the answer is in no document")
                continue
            if len(found) > 1:
                shown = ", ".join(found[:3])
                problems.append(
                    f"{path}:{lineno}: the answer is in several documents ({shown}); "
                    'name one with "document_id"'
                )
                continue
            ids = found
        assert ids is not None
        pairs.append(Pair(question, frozenset(ids), None, "qa", f"{path}:{lineno}", answer))
    _raise(path, problems, "question lines")
    if not pairs:
        raise DataError(f"{path}: no questions")
    return pairs


# --- chat data ---------------------------------------------------------------------------


def chat_pairs(path: Path) -> tuple[list[Pair], list[Document]]:
    """(user turn -> following assistant answer) pairs, and one document per distinct answer."""
    problems: list[str] = []
    pairs: list[Pair] = []
    answers: dict[str, Document] = {}
    for lineno, value, bad in _load_json_lines(path):
        reason = bad or check_example(value)
        if reason:
            problems.append(f"{path}:{lineno}: {reason}")
            continue
        messages = value["messages"]
        found = 0
        for turn, following in itertools.pairwise(messages):
            if turn["role"] != "user" or following["role"] != "assistant":
                continue
            answer = following["content"].strip()
            key = "chat:" + hashlib.sha256(normalise(answer).encode()).hexdigest()[:16]
            answers.setdefault(key, Document(key, answer, {"line": lineno}))
            query = turn["content"].strip()
            pairs.append(Pair(query, frozenset({key}), answer, "chat", f"{path}:{lineno}"))
            found += 1
        if not found:
            problems.append(f"{path}:{lineno}: no user turn followed by an assistant turn")
    _raise(path, problems, "chat lines")
    if not pairs:
        raise DataError(f"{path}: no examples")
    return pairs, list(answers.values())


# --- headings ----------------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*\Z")
_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:._])\1{2,}[ \t]*\Z")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_NUMBERING = re.compile(r"^(?:\d+(?:\.\d+)*\.?|[IVXLC]+\.)\s+")
_MARKUP = re.compile(r"[*_`]+")


@dataclass(frozen=True, slots=True)
class Section:
    title: str
    body: str


def _scan(text: str) -> tuple[list[str], dict[int, str], set[int]]:
    """(lines, title by heading line index, indices of heading and adornment lines)."""
    lines = text.splitlines()
    titles: dict[int, str] = {}
    drop: set[int] = set()
    fenced = False
    for i, line in enumerate(lines):
        if i in drop:  # the underline of a title just found (even a ~~~ one)
            continue
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        m = _ATX.match(line)
        if m:
            titles[i] = m.group(1)
            drop.add(i)
            continue
        if not line.strip() or _ADORNMENT.match(line) or i + 1 >= len(lines):
            continue
        under = _ADORNMENT.match(lines[i + 1])
        if under is None:
            continue
        over = i > 0 and lines[i - 1].strip() == lines[i + 1].strip()
        if not (i == 0 or not lines[i - 1].strip() or over):
            continue
        # reST wants the adornment at least as long as the title; Markdown setext (= or -)
        # takes any length.
        if under.group(1) not in "=-" and len(lines[i + 1].rstrip()) < len(line.rstrip()):
            continue
        titles[i] = line.strip()
        drop.update({i, i + 1} | ({i - 1} if over else set()))
    return lines, titles, drop


def sections(text: str) -> list[Section]:
    """The titled sections of ``text``: each heading and the text up to the next heading."""
    lines, titles, drop = _scan(text)
    starts = sorted(titles)
    out = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        body = "\n".join(lines[j] for j in range(start + 1, end) if j not in drop).strip()
        out.append(Section(titles[start], body))
    return out


def strip_headings(text: str) -> str:
    """``text`` without its heading lines (and their adornments)."""
    lines, _, drop = _scan(text)
    return "\n".join(line for i, line in enumerate(lines) if i not in drop).strip()


def _clean_title(title: str) -> str:
    title = _MARKUP.sub("", _NUMBERING.sub("", title.strip()))
    return " ".join(title.split()).rstrip(":").strip()


def heading_pairs(corpus: Sequence[Document], *, min_words: int = 5) -> tuple[list[Pair], int]:
    """Pseudo-queries: (cleaned heading or metadata title -> its section's text, headings off).

    A section with fewer than ``min_words`` words is skipped; a query that names sections of
    several documents is dropped (second value: how many such queries).
    """
    by_query: dict[str, dict[str, Pair]] = defaultdict(dict)
    for doc in corpus:
        candidates: list[tuple[str, str, str]] = []
        title = doc.metadata.get("title")
        if isinstance(title, str) and title.strip():
            candidates.append(("title", title, strip_headings(doc.text)))
        candidates += [("heading", s.title, s.body) for s in sections(doc.text)]
        for source, raw, body in candidates:
            query = _clean_title(raw)
            if len(query) < 3 or len(query) > 200 or not any(c.isalpha() for c in query):
                continue
            if len(body.split()) < min_words:
                continue
            key = normalise(query)
            if doc.id not in by_query[key]:  # the first of a document's equal headings
                by_query[key][doc.id] = Pair(
                    query, frozenset({doc.id}), body, source, f"{doc.id}: {raw.strip()}"
                )
    pairs = [next(iter(p.values())) for p in by_query.values() if len(p) == 1]
    return pairs, sum(1 for p in by_query.values() if len(p) > 1)


# --- passages ----------------------------------------------------------------------------


def chunk_documents(
    documents: Sequence[Document],
    offsets: OffsetsFn,
    *,
    chunk_tokens: int,
    overlap: int,
    headings: bool = True,
) -> list[Passage]:
    """The service's chunks of each document (same chunker, same token windows).

    ``headings=False`` takes heading lines out first, so that a heading used as a query does
    not find its section by the words of the heading itself.
    """
    from rag_service.chunking import ChunkingConfig, chunk_offsets

    config = ChunkingConfig(chunk_tokens, overlap)
    texts = [d.text if headings else strip_headings(d.text) for d in documents]
    out: list[Passage] = []
    batch = 256
    for lo in range(0, len(texts), batch):
        part = texts[lo : lo + batch]
        for doc, text, offs in zip(documents[lo : lo + batch], part, offsets(part), strict=True):
            out += [Passage(doc.id, c.text) for c in chunk_offsets(text, offs, config)]
    return out


# --- written questions -------------------------------------------------------------------

QUESTION_PROMPT = (
    'Passage:\n"""\n{passage}\n"""\n\n'
    "Write one question that a person could ask and that this passage answers. Use your own "
    "words rather than the passage's, in the passage's language. Reply with the question only."
)
_QUOTES = "\"'*\u201c\u201d\u2018\u2019"
_PREFIX = re.compile(r"^(?:question|q)\s*[:.)-]\s*|^\d+[.)]\s*", re.IGNORECASE)


def check_question(reply: str, passage: str) -> tuple[str, str]:
    """(the cleaned question, "") or ("", why the reply is refused)."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if not lines:
        return "", "empty reply"
    if len(lines) > 1:
        return "", "more than one line"
    question = _PREFIX.sub("", lines[0]).strip().strip(_QUOTES).strip()
    if not question.endswith("?"):
        return "", "not a question (no question mark)"
    words = len(question.split())
    if words < 3:
        return "", "too short (under 3 words)"
    if words > 40:
        return "", "too long (over 40 words)"
    if normalise(question.rstrip("?")) in normalise(passage):
        return "", "copied from the passage"
    return question, ""


def write_questions(
    client: Any,
    passages: Sequence[Passage],
    *,
    model: str | None,
    per_document: int = 1,
    seed: int = 42,
    progress: bool = False,
) -> tuple[list[Pair], Counter[str]]:
    """One written question for each of the first ``per_document`` passages of a document.

    ``client`` is an ``httpx.Client`` for the service; retrieval is switched off in each
    request so the answer comes from the generation backend alone. Second value: the
    refused replies by reason (duplicates across documents included).
    """
    import httpx
    from tqdm import tqdm

    chosen: list[Passage] = []
    taken: Counter[str] = Counter()
    for p in passages:
        if taken[p.document_id] < per_document:
            chosen.append(p)
            taken[p.document_id] += 1
    refused: Counter[str] = Counter()
    by_question: dict[str, list[Pair]] = defaultdict(list)
    for p in tqdm(chosen, desc="writing questions", disable=not progress):
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": QUESTION_PROMPT.format(passage=p.text)}],
            "temperature": 0.7,
            "max_tokens": 64,
            "seed": seed,
            "rag": {"enabled": False},
        }
        if model:
            body["model"] = model
        try:
            resp = client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise DataError(f"question writer: cannot reach {client.base_url}: {exc}") from exc
        if resp.status_code != 200:
            raise DataError(
                f"question writer: /v1/chat/completions answered {resp.status_code}: "
                f"{resp.text[:300]}"
            )
        try:
            reply = resp.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise DataError(f"question writer: unexpected answer {resp.text[:300]}") from exc
        question, why = check_question(reply, p.text)
        if why:
            refused[why] += 1
            continue
        by_question[normalise(question)].append(
            Pair(question, frozenset({p.document_id}), p.text, "generated", p.document_id)
        )
    pairs = []
    for group in by_question.values():
        if len({d for q in group for d in q.relevant}) > 1:
            refused["asked of several documents"] += len(group)
        else:
            pairs.append(group[0])
            refused["duplicate"] += len(group) - 1
    return pairs, +refused
