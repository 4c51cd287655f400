"""Question writers for ``rag-train raft``: a question per chunk whose answer the chunk holds.

Every question comes with a reference answer that is a span of the chunk, character for
character (``chunk.text[start:end]``), and a shorter *key span* inside it: the words an
answer must contain to count as right.

``template`` needs no model and is deterministic for a seed (each chunk draws from its own
generator, seeded by the seed, document id and position, so a chunk gets the same question
whatever else is sampled). It finds three kinds of candidates in the chunk:

* definitions, sentences of the shape "X is/are/means/refers to Y" with a short subject
  that is not a pronoun: "What is X?", answered by the sentence, key span the start of Y;
* headings (a reST title over its underline, a Markdown ``#`` line) followed by a sentence:
  "What is said about <heading>?", answered by that sentence;
* key sentences (8 to 40 words, mostly prose, not code): 'What follows "<its first
  words>"?', answered by the whole sentence, key span the words after the ones quoted. The
  quoted words are what retrieval finds the chunk by; the rest can only come from reading
  the source, which is what the adapter is taught (quote it and cite it).

``model`` asks a chat model (the service's own endpoint with retrieval disabled, or any
OpenAI-compatible URL) for ``{"question", "answer"}`` as JSON, the answer copied from the
chunk. Replies that are not such JSON, and answers that cannot be found in the chunk
(whitespace and case aside), are skipped and counted in :class:`WriterStats`; a failed
request is counted too. Nothing a model returns stops the run.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from trainers.raft_client import ServiceError

__all__ = [
    "ChunkRef",
    "ModelWriter",
    "QAItem",
    "QuestionWriter",
    "TemplateWriter",
    "WriterStats",
    "find_span",
    "parse_reply",
]

KEY_SPAN_WORDS = 6


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a stored document, as the service made it."""

    document_id: str
    position: int
    start: int
    end: int
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)  # the document's, layout left out
    location: dict[str, Any] = field(default_factory=dict)  # page / page_end / section

    @property
    def key(self) -> str:
        return f"{self.document_id}#{self.position}"


@dataclass(frozen=True, slots=True)
class QAItem:
    """A question about ``chunk`` and its reference: ``answer`` is
    ``chunk.text[answer_start:answer_start + len(answer)]`` and holds ``key_span``."""

    chunk: ChunkRef
    question: str
    answer: str
    answer_start: int
    key_span: str
    kind: str  # definition | heading | sentence | model


@dataclass
class WriterStats:
    """What a writer made and skipped, by reason."""

    written: int = 0
    chunks_without_question: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "chunks_without_question": self.chunks_without_question,
            "skipped": dict(self.skipped),
        }


class QuestionWriter(Protocol):
    stats: WriterStats

    def write(self, chunk: ChunkRef, seed: int) -> QAItem | None: ...


# ---- spans ----------------------------------------------------------------------------------
# A sentence ends at . ! ? before whitespace, or where its paragraph (lines without a blank
# line between them, as wrapped prose is) or its line of markup ends.
_SENTENCE = re.compile(r"\S(?:[^.!?\n]|\n(?![ \t]*\n)|[.!?](?!\s))*(?:[.!?]+(?=\s|$)|$)")
_WORD = re.compile(r"\S+")


def find_span(text: str, answer: str) -> tuple[int, int] | None:
    """Where ``answer`` occurs in ``text``: exactly, else with any whitespace between its
    words and any case. None when it does not occur."""
    answer = answer.strip().strip('"').strip()
    if not answer:
        return None
    at = text.find(answer)
    if at >= 0:
        return at, at + len(answer)
    words = answer.split()
    pattern = r"\s+".join(re.escape(w) for w in words)
    found = re.search(pattern, text, re.IGNORECASE)
    if found is None and answer[-1] in ".!?":  # the model added a full stop
        return find_span(text, answer[:-1])
    return (found.start(), found.end()) if found else None


def _sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the whole sentences of ``text``: the first is left out when the
    chunk starts inside a sentence, the last when the chunk ends inside one."""
    out = []
    for m in _SENTENCE.finditer(text):
        s, e = m.start(), m.end()
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    if out and not (text[out[0][0]].isupper() or not text[out[0][0]].isalpha()):
        out = out[1:]
    if out and text[out[-1][1] - 1] not in ".!?":
        out = out[:-1]
    return out


def _key_span(text: str, start: int, end: int) -> str:
    """The first :data:`KEY_SPAN_WORDS` words of ``text[start:end]``, as they stand."""
    words = list(_WORD.finditer(text, start, end))[:KEY_SPAN_WORDS]
    if not words:
        return ""
    return text[words[0].start() : words[-1].end()].strip(" ,;:")


def _prose(sentence: str) -> bool:
    """Mostly letters and spaces: prose, not code or a table row."""
    if not sentence:
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in sentence)
    if ">>>" in sentence or "$ " in sentence or sentence.rstrip().endswith("::"):
        return False
    return letters / len(sentence) > 0.8 and not sentence.lstrip().startswith(("...", ".."))


# ---- template writer ------------------------------------------------------------------------
_PRONOUNS = frozenset(
    re.findall(
        r"\w+",
        "it this that these those there they he she we you i here which what who one each "
        "some all both such another its their our your his her",
    )
)
_DEFINITION = re.compile(
    r"^(?P<subj>[A-Za-z`\"'][\w`\"'().\-]*(?:\s+[\w`\"'().\-]+){0,5}?)\s+"
    r"(?P<verb>is|are|means|refers to)\s+(?P<pred>\S.{8,})$",
    re.DOTALL,
)
_CLAUSE = re.compile(
    r"\b(if|when|while|which|that|who|whose|although|because|since|as|in|for|to|of|on|with|"
    r"by|from|not|can|do|does|you|we|there)\b",
    re.IGNORECASE,
)
_UNDERLINE = re.compile(r"^([=\-~^*#\"'`+]{3,})\s*\Z")
_MD_HEADING = re.compile(r"^#{1,6}\s+(\S.*)\Z")


def _definition(text: str, s: int, e: int) -> tuple[str, str] | None:
    sentence = text[s:e]
    if not 6 <= len(sentence.split()) <= 40 or not _prose(sentence):
        return None
    m = _DEFINITION.match(sentence)
    if m is None:
        return None
    subj = m.group("subj").strip()
    first = subj.split()[0].strip("`\"'").lower()
    if first in _PRONOUNS or _CLAUSE.search(subj) or subj.endswith(","):
        return None
    verb = m.group("verb")
    if not subj[0].isupper() or (subj.split()[0].isupper() and len(subj.split()[0]) > 1):
        shown = subj
    else:  # "The list type" -> "the list type", but "Python" stays
        shown = subj[0].lower() + subj[1:] if len(subj.split()) > 1 else subj
    question = {
        "is": f"What is {shown}?",
        "are": f"What are {shown}?",
        "means": f"What does {shown} mean?",
        "refers to": f"What does {shown} refer to?",
    }[verb]
    key = _key_span(text, s + m.start("pred"), e)
    return question, key


def _headings(text: str) -> list[tuple[str, int]]:
    """(heading, offset where the text under it starts) for each heading in ``text``."""
    lines = text.split("\n")
    out = []
    offset = 0
    starts = []
    for line in lines:
        starts.append(offset)
        offset += len(line) + 1
    for i, line in enumerate(lines):
        title = None
        body_line = i + 1
        md = _MD_HEADING.match(line)
        if md:
            title = md.group(1).strip()
        elif (
            i + 1 < len(lines)
            and line.strip()
            and _UNDERLINE.match(lines[i + 1])
            and len(lines[i + 1].strip()) >= len(line.strip()) - 2
        ):
            title = line.strip()
            body_line = i + 2
        if title and 2 <= len(title.split()) <= 10 and body_line < len(lines):
            out.append((title.strip("*`#:? "), starts[body_line]))
    return out


@dataclass
class TemplateWriter:
    """Questions from the chunk's own shape; see the module docstring."""

    stats: WriterStats = field(default_factory=WriterStats)

    def candidates(self, chunk: ChunkRef) -> list[QAItem]:
        text = chunk.text
        spans = _sentences(text)
        out: list[QAItem] = []

        def item(question: str, s: int, e: int, key: str, kind: str) -> None:
            if key and len(key.split()) >= 2:
                out.append(QAItem(chunk, question, text[s:e], s, key, kind))

        for s, e in spans:
            found = _definition(text, s, e)
            if found:
                item(found[0], s, e, found[1], "definition")
        for title, body in _headings(text):
            after = [(s, e) for s, e in spans if s >= body and _prose(text[s:e])]
            if after and len(text[after[0][0] : after[0][1]].split()) >= 5:
                s, e = after[0]
                item(f"What is said about {title}?", s, e, _key_span(text, s, e), "heading")
        for s, e in spans:
            sentence = text[s:e]
            if not (8 <= len(sentence.split()) <= 40 and _prose(sentence)):
                continue
            # "What follows ...?": the sentence's first words (the words a search finds it
            # by), answered by the whole sentence; the key span is what comes after them.
            words = list(_WORD.finditer(text, s, e))
            cut = min(max(4, len(words) // 2), 12)
            prefix = " ".join(w.group() for w in words[:cut])
            key = _key_span(text, words[cut].start(), e)
            item(f'What follows "{prefix}"?', s, e, key, "sentence")
        return out

    def write(self, chunk: ChunkRef, seed: int) -> QAItem | None:
        found = self.candidates(chunk)
        if not found:
            self.stats.chunks_without_question += 1
            return None
        # Definitions and headings make the clearest questions: drawn first when present.
        best = [c for c in found if c.kind != "sentence"] or found
        rng = random.Random(f"{seed}:{chunk.document_id}:{chunk.position}")
        self.stats.written += 1
        return best[rng.randrange(len(best))]


# ---- model writer ---------------------------------------------------------------------------
WRITER_PROMPT = (
    "You write one question for a reading test. Read the text and write a question that the "
    "text answers, and the answer copied word for word from the text (one sentence or "
    'phrase). Reply with JSON only: {"question": "...", "answer": "..."}'
)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```\Z")


def parse_reply(reply: str) -> tuple[str, str] | None:
    """(question, answer) from a model's reply, or None when it is not that JSON object."""
    body = _FENCE.sub("", reply.strip())
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(body[start : end + 1])
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    question, answer = obj.get("question"), obj.get("answer")
    if not (isinstance(question, str) and isinstance(answer, str)):
        return None
    if not question.strip() or not answer.strip():
        return None
    return question.strip(), answer.strip()


@dataclass
class ModelWriter:
    """Questions from a chat model. ``chat`` takes a request body and returns the OpenAI
    response (the service's :meth:`~trainers.raft_client.ServiceClient.chat`, or a call to
    another OpenAI-compatible server); ``rag`` adds ``"rag": {"enabled": false}`` (the
    service's own endpoint) so no retrieval happens."""

    chat: Any
    model: str = ""
    rag: bool = True
    max_tokens: int = 256
    stats: WriterStats = field(default_factory=WriterStats)

    def write(self, chunk: ChunkRef, seed: int) -> QAItem | None:
        body: dict[str, Any] = {
            "messages": [
                {"role": "system", "content": WRITER_PROMPT},
                {"role": "user", "content": chunk.text},
            ],
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "seed": seed,
        }
        if self.model:
            body["model"] = self.model
        if self.rag:
            body["rag"] = {"enabled": False}
        try:
            reply = self.chat(body)["choices"][0]["message"]["content"] or ""
        except (ServiceError, KeyError, IndexError, TypeError) as exc:  # counted, not fatal
            self.stats.skipped[f"request_failed: {type(exc).__name__}"] += 1
            return None
        parsed = parse_reply(str(reply))
        if parsed is None:
            self.stats.skipped["malformed_json"] += 1
            return None
        question, answer = parsed
        span = find_span(chunk.text, answer)
        if span is None:
            self.stats.skipped["answer_not_in_chunk"] += 1
            return None
        s, e = span
        self.stats.written += 1
        return QAItem(chunk, question, chunk.text[s:e], s, _key_span(chunk.text, s, e), "model")
