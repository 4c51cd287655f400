"""SQL building blocks of the postgres engine: index options, metadata filters, text queries.

Only integers the engine made itself (collection ids, dimensions, HNSW parameters) are ever
formatted into SQL text; every value that comes from a request travels as a parameter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from indexes.engine import InvalidIndex
from indexes.stopwords import content_words
from indexes.types import MetadataFilter, Scalar, canonical_json

__all__ = [
    "HNSW_MAX_DIMENSION",
    "IndexSpec",
    "compile_filter",
    "parse_index",
    "text_query",
]

HNSW_MAX_DIMENSION = 2000  # pgvector's limit for an HNSW index on `vector`
HNSW_MIN_M, HNSW_MAX_M = 4, 100
EF_CONSTRUCTION_MAX = 1000
EF_SEARCH_MAX = 1000  # pgvector's limit for hnsw.ef_search
MAX_QUERY_WORDS = 64

_HNSW = re.compile(r"HNSW(?P<m>[0-9]{1,4})(?:,Flat)?(?:,ef_construction=(?P<efc>[0-9]{1,5}))?")
_WORD = re.compile(r"\w+", re.UNICODE)
_ALLOWED = (
    "the postgres engine supports index 'Flat' (exact search) or "
    "'HNSW<M>[,ef_construction=<n>]' (pgvector HNSW, M between "
    f"{HNSW_MIN_M} and {HNSW_MAX_M}, ef_construction between 2*M and {EF_CONSTRUCTION_MAX})"
)


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """How one collection's vectors are searched: exactly, or through a pgvector HNSW index."""

    hnsw: bool
    m: int = 0
    ef_construction: int = 0

    def vector_expr(self, dimension: int, alias: str = "c") -> str:
        """The expression searches order by: the typed cast the HNSW index is built on, so
        the planner can use it, or the bare column for an exact scan."""
        if self.hnsw:
            return f"({alias}.embedding::vector({int(dimension)}))"
        return f"{alias}.embedding"


def parse_index(factory: str, dimension: int) -> IndexSpec:
    """The :class:`IndexSpec` for an index string; :class:`InvalidIndex` (a ValueError, saying
    what is allowed) when this engine cannot build it."""
    if factory == "Flat":
        return IndexSpec(hnsw=False)
    match = _HNSW.fullmatch(factory)
    if match is None:
        raise InvalidIndex(f"{_ALLOWED}; got {factory[:64]!r}")
    m = int(match["m"])
    if not HNSW_MIN_M <= m <= HNSW_MAX_M:
        raise InvalidIndex(f"HNSW M must be between {HNSW_MIN_M} and {HNSW_MAX_M}, got {m}")
    efc = int(match["efc"]) if match["efc"] is not None else max(64, 2 * m)
    if not 2 * m <= efc <= EF_CONSTRUCTION_MAX:
        raise InvalidIndex(
            f"HNSW ef_construction must be between 2*M ({2 * m}) and {EF_CONSTRUCTION_MAX}, "
            f"got {efc}"
        )
    if dimension > HNSW_MAX_DIMENSION:
        raise InvalidIndex(
            f"pgvector's HNSW index holds vectors of at most {HNSW_MAX_DIMENSION} dimensions; "
            f"this collection has {dimension}: use index 'Flat'"
        )
    return IndexSpec(hnsw=True, m=m, ef_construction=efc)


def _equivalents(value: Scalar) -> list[Scalar] | None:
    """The JSON values a filter value matches, as the embedded engine's SQLite compares them:
    ``json_extract`` turns true/false into 1/0 and compares numbers by value, so ``true``,
    ``1`` and ``1.0`` are one value there (and ``false``, ``0``, ``0.0``); strings only match
    strings. JSONB equality already treats ``1`` and ``1.0`` as equal. None: can never match
    (a non-finite float: JSON cannot hold it)."""
    if isinstance(value, bool):
        return [value, int(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float) and value in (0, 1):
        return [value, bool(value)]
    return [value]


def compile_filter(flt: MetadataFilter | None, alias: str = "d") -> tuple[str, list[Any]]:
    """SQL (over the documents table aliased ``alias``) and its parameters for a filter.

    Each condition is JSONB containment, ``metadata @> '{"key": value}'`` (or ``@> ANY`` of
    several for ``$in`` and for the values SQLite counts as equal), which the GIN index on
    ``metadata`` serves. Conditions are ANDed; an empty filter is ``TRUE``.
    """
    if flt is None or not flt.conditions:
        return "TRUE", []
    clauses: list[str] = []
    params: list[Any] = []
    for cond in flt.conditions:
        docs: list[str] = []
        for value in cond.values:
            for v in _equivalents(value) or ():
                doc = canonical_json({cond.key: v})
                if doc not in docs:
                    docs.append(doc)
        if not docs:
            clauses.append("FALSE")
        elif len(docs) == 1:
            clauses.append(f"{alias}.metadata @> %s::jsonb")
            params.append(docs[0])
        else:
            clauses.append(f"{alias}.metadata @> ANY(%s::jsonb[])")
            params.append(docs)
    return " AND ".join(clauses), params


def text_query(text: str) -> tuple[str, list[str]] | None:
    """A tsquery expression that matches any content word of ``text`` (OR, stop words left
    out, like the embedded engine's FTS5 query), and its parameters; None when the text has no
    such words."""
    words = content_words(_WORD.findall(text.lower())[:MAX_QUERY_WORDS])
    if not words:
        return None
    expr = " || ".join(["plainto_tsquery('english', %s)"] * len(words))
    return f"({expr})", words
