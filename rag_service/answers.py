"""Answer texts matched to the documents of a collection that hold them.

Two endpoints name a document by a passage of its text instead of its id: the evaluate
endpoint (rows ``{"question", "answer"}``, :mod:`rag_service.controllers.evaluation`) and the
attach endpoint for known questions (:mod:`rag_service.questions`). Both come here.

Every document of the collection is read, :data:`PAGE` at a time: the ids from
``collection.list`` (which carries no text), then the page's texts in one bulk read where the
engine offers one (:class:`~indexes.engine.DocumentTexts`: one query per page), else by
concurrent point reads. Each page is matched off the event loop by
:func:`~rag_service.evaluation.match_answers` (after
:func:`~rag_service.evaluation.normalise`), so one page of texts is held at a time. A row
keeps up to ``MAX_CANDIDATES + 1`` documents: one is its document, none or several make it
unmatched or ambiguous; once every row has more than that, reading stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from indexes.engine import Collection, DocumentTexts
from rag_service.evaluation import MAX_CANDIDATES, match_answers

__all__ = ["PAGE", "find_answers"]

# Documents read per page (their texts are held in memory while the page is matched).
PAGE = 500


async def find_answers(
    collection: Collection, answers: Mapping[int, str], *, page: int = PAGE
) -> dict[int, list[str]]:
    """For each answer (by row), the ids of the documents whose text holds it, in id order;
    documents are read ``page`` at a time."""
    found: dict[int, list[str]] = {row: [] for row in answers}
    if not answers:
        return found
    wanted = dict(answers)
    after: str | None = None
    while True:
        listed, more = await collection.list(limit=page, after=after)
        texts = await _texts(collection, [doc.id for doc in listed])
        documents = [(doc.id, texts[doc.id]) for doc in listed if doc.id in texts]
        matched = await asyncio.to_thread(match_answers, wanted, documents)
        for row, docs in matched.items():
            found[row].extend(docs[: MAX_CANDIDATES + 1 - len(found[row])])
        # A row with more candidates than are reported is ambiguous already: no more reads.
        wanted = {row: text for row, text in wanted.items() if len(found[row]) <= MAX_CANDIDATES}
        if not more or not listed or not wanted:
            return found
        after = listed[-1].id


async def _texts(collection: Collection, ids: Sequence[str]) -> dict[str, str]:
    """``{id: text}`` of those of ``ids`` still stored (a document deleted meanwhile is
    left out)."""
    if isinstance(collection, DocumentTexts):
        return await collection.texts(ids)
    rows = await asyncio.gather(*(collection.get(doc_id) for doc_id in ids))
    return {row.id: row.text for row in rows if row is not None}
