"""Known questions as keys: the questions a document answers, searched beside its chunks.

A document may carry questions (sent on upsert, or attached later from Q/A files, evaluation
pairs and chat logs). Each question is embedded once and stored as an extra vector of its
document; the engines keep them next to the chunks, in the same transaction as the document:

* ``embedded``: a ``questions`` table (id, collection, document, text, embedding) in SQLite,
  and the vectors in the collection's FAISS index under the ids ``question id +``
  :data:`QUESTION_ID_OFFSET`, so they are snapshotted, restored and reconciled with the chunks
  and count toward the index's size.
* ``postgres``: a ``rag_questions`` table with a ``vector`` column, searched exactly per
  collection (questions are few next to chunks).

A question never comes back as a search result itself. When a question key ranks, its
document scores ``max(best chunk score, question score)`` and the result is the document's
best chunk for the query (scored from the chunks' stored vectors): :func:`lift_by_questions`
turns a chunk ranking and the best question per document into one dense ranking, the same
way for both engines. Such a result's debug parts carry ``question`` (and the chunk's own
score as ``chunk``) when the question beat the chunk.

Two wordings of one question are one key when they are equal after :func:`normalise` (Unicode
form, case and whitespace). The service drops such repeats before it embeds, and the engines
compare stored questions by the same function inside their write transaction, so two
concurrent attaches of "What is X?" and "what is x?" store one of them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from indexes.types import Ranking

__all__ = [
    "QUESTION_ID_OFFSET",
    "QuestionWrite",
    "QuestionsOutcome",
    "Ranking",
    "is_question_key",
    "lift_by_questions",
    "new_questions",
    "normalise",
]

# FAISS ids of question vectors in the embedded engine: the question's row id plus this. Chunk
# row ids stay far below it (2**48 = 2.8e14 chunks), and FAISS ids are int64, so the two
# ranges never meet and any id tells which table it names.
QUESTION_ID_OFFSET = 1 << 48

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The comparison key of a text: NFKC, case-folded, every run of whitespace one space.
    Questions are deduplicated by it (service and engines alike), answers matched by it."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def new_questions(stored: list[str], questions: list[str]) -> list[int]:
    """Positions of those of ``questions`` that are new to a document holding ``stored``
    (compared after :func:`normalise`; of two equal new ones, the first)."""
    seen = {normalise(q) for q in stored}
    keep: list[int] = []
    for i, question in enumerate(questions):
        key = normalise(question)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def is_question_key(index_id: int) -> bool:
    """True for a FAISS id that names a question vector (embedded engine)."""
    return index_id >= QUESTION_ID_OFFSET


@dataclass(slots=True)
class QuestionWrite:
    """Questions to append to one document (already deduplicated by the service), with their
    vectors, one row per question."""

    document_id: str
    questions: list[str]
    vectors: np.ndarray


@dataclass(slots=True)
class QuestionsOutcome:
    """What an append of questions did. When ``missing`` (documents that do not exist) or
    ``over_limit`` (documents that would hold more than the limit) is non-empty, nothing was
    written."""

    added: dict[str, int] = field(default_factory=dict)  # document id -> questions appended
    totals: dict[str, int] = field(default_factory=dict)  # document id -> questions after
    missing: list[str] = field(default_factory=list)
    over_limit: list[str] = field(default_factory=list)

    @property
    def written(self) -> bool:
        return not self.missing and not self.over_limit


def lift_by_questions(
    chunks: Ranking,
    questions: Mapping[int, float],
    best_chunks: Mapping[int, tuple[int, float]],
) -> tuple[Ranking, dict[int, dict[str, float]]]:
    """Merge a dense chunk ranking with question hits; best first.

    ``chunks``: ``(chunk id, score)`` from the dense search. ``questions``: document key ->
    the score of its best-ranking question. ``best_chunks``: document key -> ``(chunk id,
    score)`` of that document's best chunk for the query. A document's best chunk gets the
    score ``max(own score, question score)``: lifted in place when the chunk ranked already
    (never a second result for it), added otherwise. Returns the ranking and, for each chunk
    a question lifted, its extra debug parts ``{"question": q, "chunk": own score}``. Ties
    keep the chunk ranking's order ahead of added chunks.
    """
    scores = dict(chunks)
    order = {cid: i for i, (cid, _) in enumerate(chunks)}
    extra: dict[int, dict[str, float]] = {}
    for doc, q in questions.items():
        best = best_chunks.get(doc)
        if best is None:  # a document without chunks (cannot happen) has nothing to return
            continue
        cid, own = best
        own = max(own, scores.get(cid, own))
        if q > own:
            scores[cid] = q
            extra[cid] = {"question": q, "chunk": own}
        else:
            scores.setdefault(cid, own)
    tail = len(order)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], order.get(kv[0], tail), kv[0]))
    return ranked, extra
