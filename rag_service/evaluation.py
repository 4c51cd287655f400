"""Retrieval metrics over ranked document ids, and the matching of answer texts to documents.

Pure functions: no I/O, no service objects. The evaluate endpoint
(:mod:`rag_service.controllers.evaluation`) runs the searches and hands the rankings here.
Answers are matched after :func:`normalise`, the key known questions are deduplicated by
(defined in :mod:`indexes.questions`, so the engines compare questions the same way).

Definitions (per question, then averaged over the questions that have a relevant set):

* ranking: the documents of the search hits in hit order, each kept at the rank of its best
  (first) chunk; later chunks of the same document are dropped (:func:`documents_in_order`).
* recall@k: 1 if at least one relevant document is among the first k documents, else 0; the
  reported figure is the fraction of questions with a hit in the top k. A question with several
  relevant documents (``document_ids``) counts as found as soon as any one of them is in the
  top k: it asks which questions can be answered from the top k, not what fraction of every
  relevant document came back.
* MRR@10: 1 / rank of the first relevant document when it is in the top 10, else 0.
* nDCG@10: binary relevance; DCG = sum over relevant documents at rank r <= 10 of
  1 / log2(r + 1), divided by the ideal DCG, that of min(|relevant|, 10) relevant documents at
  ranks 1, 2, ...
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from indexes.questions import normalise

__all__ = [
    "KS",
    "MAX_CANDIDATES",
    "RetrievalScores",
    "documents_in_order",
    "match_answers",
    "median",
    "ndcg_at",
    "normalise",
    "recall_at",
    "reciprocal_rank_at",
    "score_rankings",
]

KS = (1, 5, 10)
# How many matching documents are named for an ambiguous answer.
MAX_CANDIDATES = 5


@dataclass(frozen=True, slots=True)
class RetrievalScores:
    """Averages over ``questions`` rankings (all 0.0 when there are none)."""

    questions: int
    recall_at_1: float
    recall_at_5: float
    recall_at_10: float
    mrr_at_10: float
    ndcg_at_10: float


def documents_in_order(document_ids: Iterable[str]) -> list[str]:
    """The documents of chunk hits, in hit order, each once (at its best chunk's rank)."""
    return list(dict.fromkeys(document_ids))


def recall_at(ranking: Sequence[str], relevant: Collection[str], k: int) -> float:
    """1.0 if any relevant document is among the first ``k`` of ``ranking``, else 0.0."""
    return 1.0 if any(doc in relevant for doc in ranking[:k]) else 0.0


def reciprocal_rank_at(ranking: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """1 / rank of the first relevant document within the first ``k``, else 0.0."""
    for rank, doc in enumerate(ranking[:k], start=1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at(ranking: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """Binary-relevance nDCG over the first ``k``; 0.0 when ``relevant`` is empty."""
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    if ideal == 0.0:
        return 0.0
    dcg = sum(
        1.0 / math.log2(rank + 1)
        for rank, doc in enumerate(ranking[:k], start=1)
        if doc in relevant
    )
    return dcg / ideal


def score_rankings(
    rankings: Sequence[Sequence[str]], relevant: Sequence[Collection[str]]
) -> RetrievalScores:
    """The averaged metrics of ``rankings[i]`` against ``relevant[i]``."""
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings for {len(relevant)} relevant sets")
    n = len(rankings)
    if n == 0:
        return RetrievalScores(0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def mean(values: Iterable[float]) -> float:
        return sum(values) / n

    pairs = list(zip(rankings, relevant, strict=True))
    return RetrievalScores(
        questions=n,
        recall_at_1=mean(recall_at(r, rel, 1) for r, rel in pairs),
        recall_at_5=mean(recall_at(r, rel, 5) for r, rel in pairs),
        recall_at_10=mean(recall_at(r, rel, 10) for r, rel in pairs),
        mrr_at_10=mean(reciprocal_rank_at(r, rel, 10) for r, rel in pairs),
        ndcg_at_10=mean(ndcg_at(r, rel, 10) for r, rel in pairs),
    )


def median(values: Sequence[float]) -> float:
    """The p50 of ``values`` (0.0 when empty)."""
    return float(statistics.median(values)) if values else 0.0


def match_answers(
    answers: Mapping[int, str], documents: Iterable[tuple[str, str]]
) -> dict[int, list[str]]:
    """For each answer (by row), the documents whose text holds it, after :func:`normalise`.

    ``documents`` yields ``(id, text)``. Up to ``MAX_CANDIDATES + 1`` matches are kept per
    row: one match is the row's document, none or several make it unmatched or ambiguous.
    A blank answer (after normalisation) matches nothing.
    """
    wanted = {row: normalise(text) for row, text in answers.items()}
    found: dict[int, list[str]] = {row: [] for row in answers}
    for doc_id, text in documents:
        haystack = normalise(text)
        for row, needle in wanted.items():
            if needle and len(found[row]) <= MAX_CANDIDATES and needle in haystack:
                found[row].append(doc_id)
    return found
