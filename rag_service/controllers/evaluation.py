"""/v1/collections/{name}/evaluate: retrieval quality of a collection on labelled questions.

Each question goes through :meth:`KnowledgeBase.search` (the path every search takes), once
per mode, one at a time so the latency is that of a lone query. Hits are ranked by document
(best chunk first) and scored by :mod:`rag_service.evaluation`. A row names its relevant
documents (``document_id`` / ``document_ids``) or gives an ``answer`` text, matched to the one
document whose text holds it; rows that match no document or several are reported in
``unmatched`` and left out of the figures.

Modes: ``dense`` and ``hybrid`` are those retrievals alone (no reranking, whatever the
collection's defaults say); ``rerank`` is the collection's default retrieval mode (dense unless
its search defaults say hybrid) followed by the cross-encoder, i.e. what ``rerank: true`` does
to a search of the collection. Every mode ranks ``SEARCH_DEPTH`` (50) candidates, so recall@10
always looks ten documents deep: ``rerank`` reranks the first ``rerank_depth`` of them (left
out: all 50) and keeps the rest of the retrieval ranking behind them, in retrieval order; a
``rerank_depth`` deeper than 50 reranks that many candidates and keeps the best 50. Left out,
``modes`` is dense and hybrid, plus rerank when a reranker is configured; asking for rerank
without one is a 400 naming ``modes``.

Answers are matched to documents by :func:`rag_service.answers.find_answers` (shared with the
attach endpoint of known questions).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec
from litestar import Controller, post
from litestar.di import Provide
from litestar.status_codes import HTTP_200_OK

from indexes.engine import Collection
from indexes.types import Fusion
from rag_service.answers import find_answers
from rag_service.dependencies import provide_kb
from rag_service.errors import InvalidRequest
from rag_service.evaluation import MAX_CANDIDATES, documents_in_order, median, score_rankings
from rag_service.knowledge import KnowledgeBase
from rag_service.openapi import error_responses
from rag_service.schemas import Alpha, DocId, NamePath, RerankDepth

__all__ = [
    "EvaluationController",
    "EvaluationRequest",
    "EvaluationResponse",
    "EvaluationRow",
    "ModeFigures",
    "UnmatchedRow",
]

MAX_ROWS = 2000
# Search depth: deep enough that ten distinct documents remain after dropping repeated chunks.
SEARCH_DEPTH = 50

Mode = Literal["dense", "hybrid", "rerank"]
Question = Annotated[str, msgspec.Meta(min_length=1, max_length=10_000, pattern=r"\S")]
Answer = Annotated[str, msgspec.Meta(min_length=1, max_length=100_000, pattern=r"\S")]


class EvaluationRow(msgspec.Struct, forbid_unknown_fields=True):
    """A question and its relevant documents: exactly one of the three last fields."""

    question: Question
    document_id: DocId | None = None
    document_ids: Annotated[list[DocId], msgspec.Meta(min_length=1, max_length=100)] | None = None
    answer: Answer | None = None


class EvaluationRequest(msgspec.Struct, forbid_unknown_fields=True):
    rows: Annotated[list[EvaluationRow], msgspec.Meta(min_length=1, max_length=MAX_ROWS)]
    modes: (
        Annotated[
            list[Mode],
            msgspec.Meta(
                min_length=1,
                max_length=3,
                description="left out: dense, hybrid, and rerank when a reranker is configured",
            ),
        ]
        | None
    ) = None
    # Hybrid weights to evaluate; left out: the collection's search defaults, then the
    # service's settings (RAG_HYBRID_ALPHA, RAG_HYBRID_FUSION).
    alpha: Alpha | None = None
    fusion: Fusion | None = None
    # The rerank mode's reranked candidates: the first rerank_depth of the 50 retrieved (the
    # rest follow in retrieval order); left out: all 50.
    rerank_depth: RerankDepth | None = None


class ModeFigures(msgspec.Struct):
    recall_at_1: float = msgspec.field(name="recall@1")
    recall_at_5: float = msgspec.field(name="recall@5")
    recall_at_10: float = msgspec.field(name="recall@10")
    mrr_at_10: float = msgspec.field(name="mrr@10")
    ndcg_at_10: float = msgspec.field(name="ndcg@10")
    latency_p50_ms: float


class UnmatchedRow(msgspec.Struct):
    """A row left out: its answer is in no document (``no_match``) or in several
    (``ambiguous``, naming up to five), or none of its document ids exist (``unknown_document``).
    ``row`` is the 0-based index in ``rows``."""

    row: int
    reason: Literal["no_match", "ambiguous", "unknown_document"]
    documents: list[str]


class EvaluationResponse(msgspec.Struct):
    collection: str
    rows: int
    evaluated: int
    top_k: int
    unmatched: list[UnmatchedRow]
    modes: dict[str, ModeFigures]
    object: str = "evaluation"


class EvaluationController(Controller):
    path = "/collections/{name:str}"
    dependencies = {"kb": Provide(provide_kb, sync_to_thread=False)}

    @post(
        "/evaluate",
        status_code=HTTP_200_OK,
        opt={"access": "read"},
        responses=error_responses(404, 409),
    )
    async def evaluate(
        self, name: NamePath, data: EvaluationRequest, kb: KnowledgeBase
    ) -> EvaluationResponse:
        _check_rows(data.rows, kb.settings.max_query_chars)
        wanted = _modes(data.modes, reranker=kb.reranker is not None)
        collection = await kb.collection(name)
        relevant, unmatched = await _relevant_sets(collection, data.rows)
        top_k = min(kb.settings.max_top_k, SEARCH_DEPTH)
        modes: dict[str, ModeFigures] = {}
        for mode in wanted:
            rankings: list[list[str]] = []
            latencies: list[float] = []
            for row, _ in relevant:
                t0 = time.perf_counter()
                hits, _timings = await kb.search(
                    name,
                    data.rows[row].question,
                    top_k=top_k,
                    rerank_depth=(data.rerank_depth or top_k) if mode == "rerank" else None,
                    mode=None if mode == "rerank" else mode,
                    alpha=data.alpha,
                    fusion=data.fusion,
                    rerank=mode == "rerank",
                    keep_unreranked=True,
                )
                latencies.append((time.perf_counter() - t0) * 1000)
                rankings.append(documents_in_order(h.hit.document_id for h in hits))
            scores = score_rankings(rankings, [docs for _, docs in relevant])
            modes[mode] = ModeFigures(
                recall_at_1=round(scores.recall_at_1, 6),
                recall_at_5=round(scores.recall_at_5, 6),
                recall_at_10=round(scores.recall_at_10, 6),
                mrr_at_10=round(scores.mrr_at_10, 6),
                ndcg_at_10=round(scores.ndcg_at_10, 6),
                latency_p50_ms=round(median(latencies), 3),
            )
        return EvaluationResponse(
            collection=name,
            rows=len(data.rows),
            evaluated=len(relevant),
            top_k=top_k,
            unmatched=unmatched,
            modes=modes,
        )


def _modes(asked: list[Mode] | None, *, reranker: bool) -> list[Mode]:
    """The modes to evaluate, each once, in the order asked."""
    if asked is None:
        return ["dense", "hybrid", "rerank"] if reranker else ["dense", "hybrid"]
    if "rerank" in asked and not reranker:
        raise InvalidRequest(
            "modes holds rerank but no reranker is configured: set RAG_RERANKER_MODEL to a "
            "cross-encoder directory",
            param="modes",
        )
    return list(dict.fromkeys(asked))


def _check_rows(rows: list[EvaluationRow], max_query_chars: int) -> None:
    for i, row in enumerate(rows):
        given = [
            f for f in ("document_id", "document_ids", "answer") if getattr(row, f) is not None
        ]
        if len(given) != 1:
            raise InvalidRequest(
                f"rows[{i}] must give exactly one of document_id, document_ids or answer"
                + (f"; it gives {', '.join(given)}" if given else ""),
                param=f"rows[{i}].{given[1] if len(given) > 1 else 'document_id'}",
            )
        if len(row.question) > max_query_chars:
            raise InvalidRequest(
                f"rows[{i}].question is longer than {max_query_chars} characters "
                "(RAG_MAX_QUERY_CHARS)",
                param=f"rows[{i}].question",
            )


async def _relevant_sets(
    collection: Collection, rows: list[EvaluationRow]
) -> tuple[list[tuple[int, frozenset[str]]], list[UnmatchedRow]]:
    """For each usable row (by index), its relevant documents; and the rows left out."""
    named: dict[int, list[str]] = {}
    answers: dict[int, str] = {}
    for i, row in enumerate(rows):
        if row.answer is not None:
            answers[i] = row.answer
        else:
            named[i] = [row.document_id] if row.document_id is not None else row.document_ids or []
    existing = await collection.existing(
        list(dict.fromkeys(d for ids in named.values() for d in ids))
    )
    matches = await find_answers(collection, answers)
    relevant: list[tuple[int, frozenset[str]]] = []
    unmatched: list[UnmatchedRow] = []
    for i in range(len(rows)):
        if i in named:
            docs = frozenset(d for d in named[i] if d in existing)
            if not docs:
                unmatched.append(UnmatchedRow(i, "unknown_document", named[i][:MAX_CANDIDATES]))
                continue
        else:
            found = matches[i]
            if len(found) != 1:
                reason: Literal["no_match", "ambiguous"] = "ambiguous" if found else "no_match"
                unmatched.append(UnmatchedRow(i, reason, found[:MAX_CANDIDATES]))
                continue
            docs = frozenset(found)
        relevant.append((i, docs))
    return relevant, unmatched
