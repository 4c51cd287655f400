"""/v1/collections/{name}/questions: attach known questions to documents without their text.

Rows name their document (``document_id``) or give an ``answer`` text matched to the one
document that holds it; see :mod:`rag_service.questions` for what is appended and when a
request is refused (nothing is written then).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from litestar import Controller, post
from litestar.di import Provide
from litestar.status_codes import HTTP_200_OK

from rag_service.dependencies import provide_kb
from rag_service.knowledge import KnowledgeBase
from rag_service.openapi import error_responses
from rag_service.questions import AttachRow, attach_questions
from rag_service.schemas import DocId, NamePath, QuestionText

__all__ = [
    "AttachedDocument",
    "QuestionController",
    "QuestionRowIn",
    "QuestionsRequest",
    "QuestionsResponse",
    "UnmatchedQuestion",
]

MAX_ROWS = 10_000

Answer = Annotated[str, msgspec.Meta(min_length=1, max_length=100_000, pattern=r"\S")]


class QuestionRowIn(msgspec.Struct, forbid_unknown_fields=True):
    """A question and the document it belongs to: exactly one of ``document_id`` or
    ``answer`` (a text found in exactly one document)."""

    question: QuestionText
    document_id: DocId | None = None
    answer: Answer | None = None


class QuestionsRequest(msgspec.Struct, forbid_unknown_fields=True):
    questions: Annotated[list[QuestionRowIn], msgspec.Meta(min_length=1, max_length=MAX_ROWS)]


class AttachedDocument(msgspec.Struct):
    id: str
    added: int  # questions appended by this request
    questions: int  # questions the document holds now


class UnmatchedQuestion(msgspec.Struct):
    """A row left out: its answer is in no document (``no_match``) or in several
    (``ambiguous``, naming up to five). ``row`` is the 0-based index in ``questions``."""

    row: int
    reason: Literal["no_match", "ambiguous"]
    documents: list[str]


class QuestionsResponse(msgspec.Struct):
    collection: str
    added: int
    documents: list[AttachedDocument]
    unmatched: list[UnmatchedQuestion]
    object: str = "questions"


class QuestionController(Controller):
    path = "/collections/{name:str}"
    dependencies = {"kb": Provide(provide_kb, sync_to_thread=False)}

    @post(
        "/questions",
        status_code=HTTP_200_OK,
        opt={"access": "write"},
        responses=error_responses(404, 409),
    )
    async def attach(
        self, name: NamePath, data: QuestionsRequest, kb: KnowledgeBase
    ) -> QuestionsResponse:
        """Append known questions to documents (duplicates dropped); all or nothing."""
        rows = [AttachRow(r.question, r.document_id, r.answer) for r in data.questions]
        outcome = await attach_questions(kb, name, rows)
        return QuestionsResponse(
            collection=name,
            added=outcome.added,
            documents=[
                AttachedDocument(doc, added, total)
                for doc, (added, total) in outcome.documents.items()
            ],
            unmatched=[
                UnmatchedQuestion(row, reason, docs)  # type: ignore[arg-type]
                for row, reason, docs in outcome.unmatched
            ],
        )
