"""Value types shared by the storage engines and the service.

Every engine speaks these: typed collection options, chunks, document writes, a parsed metadata
filter (each engine compiles it to its own SQL), a search query and its hits.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "Chunk",
    "CollectionOptions",
    "CollectionRow",
    "Condition",
    "DocumentRow",
    "DocumentWrite",
    "FilterError",
    "Hit",
    "MetadataFilter",
    "ScoredHit",
    "SearchQuery",
    "WriteOutcome",
    "canonical_json",
    "content_hash",
    "fuse_rrf",
]

Scalar = str | int | float | bool
SearchMode = Literal["dense", "hybrid"]

RRF_K = 60
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
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
    """One document of an upsert. ``chunks`` is None when only metadata may change."""

    id: str
    text: str
    metadata: dict[str, Any]
    content_hash: str
    chunks: list[Chunk] | None
    vectors: np.ndarray | None = None


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
    hit: Hit
    score: float


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
    # No other search is in flight in this process: an engine may then answer a small one on
    # the event loop, cheaper than a thread hand-off. Searches that overlap come back from
    # the encoder in one batch, and answered inline they would add up to one long stall.
    alone: bool = False


def fuse_rrf(rankings: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of (id, score) rankings, best first: score(id) = sum over the
    rankings of 1 / (RRF_K + rank). Both engines fuse hybrid searches with it."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (cid, _) in enumerate(ranking, start=1):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda kv: kv[1], reverse=True)
