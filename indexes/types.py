"""Value types shared by the storage engines and the service.

Every engine speaks these: typed collection options, chunks, document writes, a parsed metadata
filter (each engine compiles it to its own SQL), a search query and its hits, and the search
vocabulary (:data:`SearchMode`, :data:`Fusion`, :data:`Ranking`) the service's wire types and
settings import from here. Light to import (numpy only for type checking), since the CLI's
settings import it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "Chunk",
    "CollectionOptions",
    "CollectionRow",
    "Condition",
    "DocumentRow",
    "DocumentWrite",
    "FilterError",
    "Fusion",
    "Hit",
    "MetadataFilter",
    "Ranking",
    "ScoredHit",
    "SearchMode",
    "SearchQuery",
    "WriteOutcome",
    "canonical_json",
    "content_hash",
    "fuse",
]

Scalar = str | int | float | bool
SearchMode = Literal["dense", "hybrid"]
Fusion = Literal["convex", "rrf"]  # how a hybrid search fuses its rankings (see fuse)
Ranking = list[tuple[int, float]]  # (chunk id, score), best first

RRF_K = 60
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
MAX_IN_VALUES = 256


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class CollectionOptions:
    """What a collection is made with; validated by the service before an engine sees it."""

    name: str
    embedding_model: str
    dimension: int
    index: str = "Flat"
    chunk_tokens: int = 200
    chunk_overlap: int = 40
    # Search defaults for the collection (mode, alpha, fusion, ...), validated by the service;
    # a request's own values win over them.
    search: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CollectionRow:
    """A stored collection: its options and counters."""

    id: int
    name: str
    embedding_model: str
    dimension: int
    index_factory: str
    chunk_tokens: int
    chunk_overlap: int
    documents: int
    chunks: int
    created_at: float
    search: dict[str, Any] = field(default_factory=dict)
    # Known questions stored as extra keys of the documents (see :mod:`indexes.questions`).
    questions: int = 0

    @classmethod
    def of(
        cls, options: CollectionOptions, *, id: int = 0, created_at: float = 0.0
    ) -> CollectionRow:
        """A new (empty) collection's row; id 0 while it is not stored yet."""
        return cls(
            id,
            options.name,
            options.embedding_model,
            options.dimension,
            options.index,
            options.chunk_tokens,
            options.chunk_overlap,
            0,
            0,
            created_at,
            dict(options.search),
        )


@dataclass(frozen=True, slots=True)
class DocumentRow:
    id: str
    text: str
    metadata: dict[str, Any]
    content_hash: str
    chunks: int
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a document: its place in the text and the text itself."""

    position: int
    start: int
    end: int
    text: str


@dataclass(slots=True)
class DocumentWrite:
    """One document of an upsert. ``chunks`` is None when only metadata may change.

    ``questions``: the document's known questions after the write (None: keep the stored
    ones). ``question_vectors``: their vectors, or None when the service found the stored
    questions equal to ``questions`` (an engine that finds them changed raises StaleWrite).
    """

    id: str
    text: str
    metadata: dict[str, Any]
    content_hash: str
    chunks: list[Chunk] | None
    vectors: np.ndarray | None = None
    questions: list[str] | None = None
    question_vectors: np.ndarray | None = None


@dataclass(slots=True)
class WriteOutcome:
    """What an upsert did, per document id."""

    statuses: dict[str, str] = field(default_factory=dict)  # created / updated / unchanged
    chunk_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hit:
    chunk_id: int
    document_id: str
    text: str
    metadata: dict[str, Any]
    position: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ScoredHit:
    """A hit and its score; ``parts`` holds the scores it was made of (``dense``, ``bm25``,
    ``fused``, ``rerank``), shown in debug output."""

    hit: Hit
    score: float
    parts: dict[str, float] = field(default_factory=dict)


class FilterError(ValueError):
    """A metadata filter is malformed; ``param`` names the offending part."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Condition:
    """``key`` equals one of ``values`` (one value: equality; several: ``$in``)."""

    key: str
    values: tuple[Scalar, ...]


@dataclass(frozen=True, slots=True)
class MetadataFilter:
    """Metadata filter: ``{"key": value}`` or ``{"key": {"$in": [v, ...]}}``, conditions ANDed.

    Keys are metadata field names; values are strings, numbers or booleans. Each engine
    compiles the conditions to its own SQL.
    """

    conditions: tuple[Condition, ...]

    @classmethod
    def parse(cls, raw: dict[str, Any] | None, param: str = "filter") -> MetadataFilter | None:
        if not raw:
            return None
        if not isinstance(raw, dict):
            raise FilterError("filter must be an object of metadata conditions", param)
        conditions = []
        for key, cond in raw.items():
            where = f"{param}.{key}"
            if not _KEY.match(key):
                raise FilterError(
                    f"filter key {key!r} is not a valid metadata field name "
                    "(letters, digits, '_', '.', '-')",
                    where,
                )
            if isinstance(cond, dict):
                if set(cond) != {"$in"}:
                    raise FilterError(
                        f"filter on {key!r}: only {{'$in': [...]}} is supported as an operator",
                        where,
                    )
                values = cond["$in"]
                if not isinstance(values, list) or not 1 <= len(values) <= MAX_IN_VALUES:
                    raise FilterError(
                        f"filter on {key!r}: $in needs a list of 1-{MAX_IN_VALUES} values",
                        where + ".$in",
                    )
                for v in values:
                    _check_scalar(v, key, where + ".$in")
                conditions.append(Condition(key, tuple(values)))
            else:
                _check_scalar(cond, key, where)
                conditions.append(Condition(key, (cond,)))
        return cls(tuple(conditions))


def _check_scalar(value: Any, key: str, where: str) -> None:
    if not isinstance(value, str | int | float | bool):
        raise FilterError(f"filter on {key!r}: values must be strings, numbers or booleans", where)
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise FilterError(f"filter on {key!r}: integers must fit in 64 bits", where)


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """One search, validated by the service: the query's text and vector, and its options."""

    text: str
    vector: np.ndarray  # shape (1, dimension), normalised
    top_k: int
    filter: MetadataFilter | None = None
    min_score: float | None = None
    mode: SearchMode = "dense"
    # Hybrid only: the weight of the dense ranking (1 - alpha goes to BM25) and how the two
    # rankings are fused (see :func:`fuse`).
    alpha: float = 0.5
    fusion: Fusion = "convex"
    # No other search is in flight in this process: an engine may then answer a small one on
    # the event loop, cheaper than a thread hand-off. Searches that overlap come back from
    # the encoder in one batch, and answered inline they would add up to one long stall.
    alone: bool = False
    # The model that made ``vector``: an engine refuses the query (ModelChanged) when the
    # collection no longer records it, because a reindex swapped meanwhile. None: unchecked.
    embedding_model: str | None = None


def fuse(
    dense: Ranking, sparse: Ranking, *, alpha: float, fusion: Fusion = "convex"
) -> tuple[Ranking, dict[int, dict[str, float]]]:
    """Fuse a dense and a BM25 ranking (``(id, score)``, best first) into one, best first,
    plus each id's parts (``dense``, ``bm25``: the raw scores it had; ``fused``) for debug.

    ``convex``: ``alpha * d + (1 - alpha) * s / s_max``: ``d`` is the dense score as it is (a
    cosine, on the same scale for every query; an id the dense ranking did not return gets its
    lowest score), ``s`` the BM25 score divided by the best BM25 score among the candidates
    (0 for an id BM25 did not return). The dense score is not stretched: min-max normalising it
    turns a near-tie of two chunks into a gap as wide as a clear win, and BM25 then overturns
    rankings dense was sure of (measured in benchmarks/bench_hybrid.py: on four question sets
    it lost up to 0.08 recall@1 where this form gained). ``rrf``: weighted reciprocal rank
    fusion, ``alpha / (RRF_K + rank_d) + (1 - alpha) / (RRF_K + rank_s)``. ``alpha`` 1 ranks
    by dense alone, 0 by BM25 alone. Ties keep the dense order. Both engines fuse hybrid
    searches with it.
    """
    parts: dict[int, dict[str, float]] = {}
    for name, ranking in (("dense", dense), ("bm25", sparse)):
        for cid, score in ranking:
            parts.setdefault(cid, {})[name] = score
    fused: dict[int, float] = dict.fromkeys(parts, 0.0)
    if fusion == "rrf":
        for weight, ranking in ((alpha, dense), (1.0 - alpha, sparse)):
            for rank, (cid, _) in enumerate(ranking, start=1):
                fused[cid] += weight / (RRF_K + rank)
    else:
        floor = min((score for _, score in dense), default=0.0)
        top = max((score for _, score in sparse), default=0.0)
        for cid, part in parts.items():
            bm25 = part.get("bm25", 0.0) / top if top > 0 else 0.0
            fused[cid] = alpha * part.get("dense", floor) + (1.0 - alpha) * bm25
    order = {cid: i for i, (cid, _) in enumerate(dense)}
    tail = len(order)
    ranked = sorted(fused.items(), key=lambda kv: (-kv[1], order.get(kv[0], tail)))
    for cid, score in ranked:
        parts[cid]["fused"] = score
    return ranked, parts
