"""Known questions as keys: the service side (validation, embedding, attaching).

A document may carry the questions it answers. Each is embedded once, with the model that
embeds the chunks, and stored as an extra key of its document; a search that matches a
question returns the document's best chunk, scored ``max(best chunk, question)`` (the engines
do the ranking: :mod:`indexes.questions`). Questions reach a document three ways:

* on upsert: ``{"id", "text", "questions": [...]}``. Left out, the stored questions stay (a
  re-ingest of the same or an edited text keeps them); ``[]`` removes them; a list replaces
  them. Text unchanged and the same questions: ``unchanged``; only the questions differ: only
  they are embedded (``updated``).
* attached without the text, ``POST /v1/collections/{name}/questions`` with rows
  ``{"question", "document_id"}`` or ``{"question", "answer"}`` (the answer text matched to the
  one document that holds it, as the evaluate endpoint matches answers): appended to what the
  document holds, duplicates dropped. An unknown ``document_id`` is a 404 naming the row, a
  document pushed past :data:`MAX_QUESTIONS_PER_DOCUMENT` a 400 naming the row: nothing is
  written then. Answers that match no document or several are reported and left out.
* from files, ``rag-service questions add FILE``: Q/A rows (the format of ``rag-service eval``,
  so evaluation pairs serve too) or chat logs (``{"messages": [...]}``: each user turn whose
  assistant answer is found in a document), sent to the endpoint above.

Questions are compared after :func:`~rag_service.evaluation.normalise` (case, Unicode form and
whitespace) to drop duplicates; the first wording is kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from indexes.engine import Collection
from indexes.questions import QuestionsOutcome, QuestionWrite
from indexes.reindex import ModelChanged
from rag_service.answers import find_answers
from rag_service.errors import DocumentNotFound, InvalidRequest
from rag_service.evaluation import MAX_CANDIDATES, normalise
from rag_service.schemas import MAX_QUESTIONS_PER_DOCUMENT, DocumentIn

if TYPE_CHECKING:  # the knowledge base imports this module
    from rag_service.embedders import LoadedModel
    from rag_service.knowledge import KnowledgeBase

__all__ = [
    "ATTACH_ATTEMPTS",
    "AttachOutcome",
    "AttachRow",
    "attach_questions",
    "document_questions",
    "embed_texts",
    "matched_by",
    "unique_questions",
    "upsert_questions",
]

# A reindex that swaps the collection's model between the embedding and the write makes the
# engine refuse the write (ModelChanged); the questions are embedded again with the new model.
ATTACH_ATTEMPTS = 3


def matched_by(parts: Mapping[str, float]) -> Literal["chunk", "question"]:
    """What ranked a result: ``question`` when a known question lifted it (its debug parts
    carry ``question``), else ``chunk``."""
    return "question" if "question" in parts else "chunk"


def unique_questions(questions: Sequence[str], param: str) -> list[str]:
    """``questions`` without repeats (after :func:`normalise`), first wording kept;
    :class:`InvalidRequest` naming ``param[i]`` for one that holds a NUL character."""
    seen: set[str] = set()
    out: list[str] = []
    for i, question in enumerate(questions):
        if "\x00" in question:
            raise InvalidRequest("question holds a NUL character (U+0000)", param=f"{param}[{i}]")
        key = normalise(question)
        if key not in seen:
            seen.add(key)
            out.append(question)
    return out


async def embed_texts(
    kb: KnowledgeBase, texts: list[str], model: LoadedModel | None = None
) -> np.ndarray:
    """Vectors of ``texts`` on the bulk lane (as document chunks are embedded), by the
    collection's ``model`` (default: the service's default model)."""
    return await (model or kb.models.default).embed_bulk(texts)


async def upsert_questions(
    kb: KnowledgeBase,
    collection: Collection | None,
    docs: Sequence[DocumentIn],
    *,
    skip_unchanged: bool,
    model: LoadedModel | None = None,
) -> dict[int, tuple[list[str], np.ndarray | None]]:
    """For each document of an upsert that brings ``questions`` (by position): its questions
    and their vectors, or None for the vectors when the stored questions are the same (then
    nothing is embedded; the engine checks again inside its transaction)."""
    given = {
        i: unique_questions(d.questions, f"documents[{i}].questions")
        for i, d in enumerate(docs)
        if d.questions is not None
    }
    if not given:
        return {}
    stored: dict[str, list[str]] = {}
    if collection is not None and skip_unchanged:
        stored = await collection.questions([docs[i].id for i in given])
    embed = [i for i, qs in given.items() if not skip_unchanged or stored.get(docs[i].id, []) != qs]
    vectors = await embed_texts(kb, [q for i in embed for q in given[i]], model)
    out: dict[int, tuple[list[str], np.ndarray | None]] = {i: (qs, None) for i, qs in given.items()}
    offset = 0
    for i in embed:
        n = len(given[i])
        out[i] = (given[i], vectors[offset : offset + n])
        offset += n
    return out


async def document_questions(kb: KnowledgeBase, name: str, doc_id: str) -> list[str]:
    """The stored questions of one document (empty when it has none)."""
    collection = await kb.collection(name)
    return (await collection.questions([doc_id])).get(doc_id, [])


@dataclass(frozen=True, slots=True)
class AttachRow:
    """One question to attach: to ``document_id``, or to the document holding ``answer``."""

    question: str
    document_id: str | None = None
    answer: str | None = None


@dataclass(slots=True)
class AttachOutcome:
    added: int = 0
    # document id -> (questions added, questions it holds now)
    documents: dict[str, tuple[int, int]] = field(default_factory=dict)
    # (row, "no_match" / "ambiguous", candidate documents) for answers left out
    unmatched: list[tuple[int, str, list[str]]] = field(default_factory=list)


async def attach_questions(
    kb: KnowledgeBase, name: str, rows: Sequence[AttachRow], *, param: str = "questions"
) -> AttachOutcome:
    """Append questions to documents without resending their text (see the module docstring).
    All of it is written in one transaction, or nothing. When a reindex swaps the collection
    to another embedding model between the embedding and the write, the questions are
    embedded again with the new model (up to :data:`ATTACH_ATTEMPTS` times in all)."""
    for i, row in enumerate(rows):
        if (row.document_id is None) == (row.answer is None):
            raise InvalidRequest(
                f"{param}[{i}] must give exactly one of document_id or answer",
                param=f"{param}[{i}].document_id",
            )
        unique_questions([row.question], f"{param}[{i}].question")
    collection = await kb.collection(name, vectors=True)
    outcome = AttachOutcome()
    named = [i for i, r in enumerate(rows) if r.document_id is not None]
    existing = await collection.existing(list({rows[i].document_id or "" for i in named}))
    for i in named:
        if rows[i].document_id not in existing:
            raise DocumentNotFound(
                f"document {rows[i].document_id!r} not found in collection {name!r}",
                param=f"{param}[{i}].document_id",
            )
    target: dict[int, str] = {i: rows[i].document_id or "" for i in named}
    answers = {i: r.answer for i, r in enumerate(rows) if r.answer is not None}
    if answers:
        for i, found in (await find_answers(collection, answers)).items():
            if len(found) == 1:
                target[i] = found[0]
            else:
                reason = "ambiguous" if found else "no_match"
                outcome.unmatched.append((i, reason, found[:MAX_CANDIDATES]))
    outcome.unmatched.sort()
    for attempt in range(ATTACH_ATTEMPTS):
        try:
            await _attach(kb, name, rows, target, outcome, param)
            return outcome
        except ModelChanged:  # a reindex swapped meanwhile: embed with the new model
            if attempt == ATTACH_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def _attach(
    kb: KnowledgeBase,
    name: str,
    rows: Sequence[AttachRow],
    target: dict[int, str],
    outcome: AttachOutcome,
    param: str,
) -> None:
    """Plan, embed (with the model the collection records now) and write the questions of
    ``rows`` to the documents of ``target`` (row -> document id); fills ``outcome``."""
    collection = await kb.collection(name, vectors=True)
    model = await kb.model_for(collection.row)
    stored = await collection.questions(list(dict.fromkeys(target.values())))
    seen = {doc: {normalise(q) for q in qs} for doc, qs in stored.items()}
    plan: dict[str, list[tuple[int, str]]] = {}
    for i in sorted(target):
        doc, question = target[i], rows[i].question
        key = normalise(question)
        if key in seen.setdefault(doc, set()):
            continue
        seen[doc].add(key)
        plan.setdefault(doc, []).append((i, question))
        if len(stored.get(doc, ())) + len(plan[doc]) > MAX_QUESTIONS_PER_DOCUMENT:
            raise InvalidRequest(
                f"document {doc!r} would hold more than {MAX_QUESTIONS_PER_DOCUMENT} questions",
                param=f"{param}[{i}].question",
            )
    result = QuestionsOutcome()
    if plan:  # else every row repeats a stored question: no write at all
        texts = [q for planned in plan.values() for _, q in planned]
        vectors = await embed_texts(kb, texts, model)
        writes: list[QuestionWrite] = []
        offset = 0
        for doc, planned in plan.items():
            writes.append(
                QuestionWrite(doc, [q for _, q in planned], vectors[offset : offset + len(planned)])
            )
            offset += len(planned)
        result = await collection.add_questions(
            writes, limit=MAX_QUESTIONS_PER_DOCUMENT, model=model.id
        )
    if result.missing:  # deleted since the check above
        first = min(i for doc in result.missing for i, _ in plan[doc])
        raise DocumentNotFound(
            f"document {target[first]!r} not found in collection {name!r}",
            param=f"{param}[{first}].document_id",
        )
    if result.over_limit:  # others attached questions meanwhile
        first = min(i for doc in result.over_limit for i, _ in plan[doc])
        raise InvalidRequest(
            f"document {target[first]!r} would hold more than {MAX_QUESTIONS_PER_DOCUMENT} "
            "questions",
            param=f"{param}[{first}].question",
        )
    for doc in dict.fromkeys(target.values()):
        added = result.added.get(doc, 0)
        total = result.totals.get(doc, len(stored.get(doc, ())))
        outcome.documents[doc] = (added, total)
        outcome.added += added
