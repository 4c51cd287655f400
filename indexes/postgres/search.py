"""The postgres engine's retrieval queries: dense (pgvector), sparse (tsvector), hydration.

Each runs on a connection inside the caller's read-only transaction; scores are plain floats,
rankings are ``[(chunk_id, score)]`` best first. Dense scores are inner products of normalised
vectors (cosine), as in the embedded engine.

Known questions (:func:`question_ranking`) have no vector index: every question of the
collection (that the filter lets through) is scored exactly on each search, so its cost grows
linearly with the collection's question count, like a Flat index. That suits the intended
scale (at most 64 per document, attached by hand or from Q/A files: thousands to tens of
thousands per collection); past a few hundred thousand questions a collection wants an HNSW
index on ``rag_questions.embedding``, which this engine does not build. A collection without
questions pays nothing: :func:`collection_state` reads whether any exist (an EXISTS on the
questions table, true for every replica) in the statement that checks the embedding model,
and the question query is skipped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from psycopg import AsyncConnection

from indexes.postgres.sql import IndexSpec, text_query
from indexes.types import CollectionRow, Hit

__all__ = [
    "best_chunks",
    "collection_state",
    "count_matching",
    "dense_ranking",
    "hydrate",
    "question_ranking",
    "sparse_ranking",
]

_EXACT = IndexSpec(hnsw=False)


def _scope(row: CollectionRow, flt_sql: str) -> tuple[str, str]:
    """The FROM-clause join and the WHERE clause restricting chunks to the collection (and to
    the filter's documents)."""
    cid = int(row.id)
    if flt_sql == "TRUE":
        return "", f"c.collection_id = {cid}"
    join = " JOIN rag_documents d ON d.pk = c.doc_pk"
    return join, f"c.collection_id = {cid} AND d.collection_id = {cid} AND {flt_sql}"


async def collection_state(conn: AsyncConnection, row: CollectionRow) -> tuple[str | None, bool]:
    """The embedding model the collection records (None once it is dropped) and whether it
    holds any known question, as the caller's transaction sees them: one round trip."""
    cur = await conn.execute(
        "SELECT c.embedding_model, EXISTS (SELECT 1 FROM rag_questions q "
        "WHERE q.collection_id = c.id) FROM rag_collections c WHERE c.id = %s",
        (int(row.id),),
    )
    found = await cur.fetchone()
    if found is None:
        return None, False
    return str(found[0]), bool(found[1])


async def dense_ranking(
    conn: AsyncConnection,
    row: CollectionRow,
    spec: IndexSpec,
    vector: np.ndarray,
    depth: int,
    flt_sql: str,
    flt_params: list[Any],
    *,
    exact: bool,
) -> list[tuple[int, float]]:
    """The ``depth`` chunks nearest to ``vector`` by inner product. ``exact`` orders by the bare
    column, which no HNSW index serves, so the planner computes every (filtered) distance."""
    expr = (_EXACT if exact else spec).vector_expr(row.dimension)
    join, where = _scope(row, flt_sql)
    cur = await conn.execute(
        f"SELECT c.id, {expr} <#> %b AS dist FROM rag_chunks c{join} "
        f"WHERE {where} ORDER BY dist LIMIT %s",
        [vector, *flt_params, depth],
    )
    return [(int(r[0]), -float(r[1])) for r in await cur.fetchall()]


async def count_matching(
    conn: AsyncConnection, row: CollectionRow, flt_sql: str, flt_params: list[Any], cap: int
) -> int:
    """How many chunks the filter lets through, counting no further than ``cap``."""
    join, where = _scope(row, flt_sql)
    cur = await conn.execute(
        f"SELECT count(*) FROM (SELECT 1 FROM rag_chunks c{join} WHERE {where} LIMIT %s) s",
        [*flt_params, cap],
    )
    got = await cur.fetchone()
    return int(got[0]) if got else 0


async def sparse_ranking(
    conn: AsyncConnection,
    row: CollectionRow,
    text: str,
    depth: int,
    flt_sql: str,
    flt_params: list[Any],
) -> list[tuple[int, float]]:
    """Chunks holding any word of ``text``, ranked by ``ts_rank_cd`` (cover density, divided
    by 1 + log of the chunk's length, a BM25-like length normalisation)."""
    tsq = text_query(text)
    if tsq is None:
        return []
    expr, words = tsq
    join, where = _scope(row, flt_sql)
    cur = await conn.execute(
        f"SELECT c.id, ts_rank_cd(c.tsv, q.query, 1) AS rank "
        f"FROM (SELECT {expr} AS query) q, rag_chunks c{join} "
        f"WHERE {where} AND c.tsv @@ q.query ORDER BY rank DESC, c.id LIMIT %s",
        [*words, *flt_params, depth],
    )
    return [(int(r[0]), float(r[1])) for r in await cur.fetchall()]


async def question_ranking(
    conn: AsyncConnection,
    row: CollectionRow,
    vector: np.ndarray,
    depth: int,
    flt_sql: str,
    flt_params: list[Any],
) -> list[tuple[int, float]]:
    """``(document pk, score of its best question)`` for the ``depth`` documents whose known
    questions are nearest to ``vector`` (exact: every question of the collection is scored,
    one row per document)."""
    cid = int(row.id)
    join, where = "", f"q.collection_id = {cid}"
    if flt_sql != "TRUE":
        join = " JOIN rag_documents d ON d.pk = q.doc_pk"
        where += f" AND d.collection_id = {cid} AND {flt_sql}"
    cur = await conn.execute(
        f"SELECT q.doc_pk, min(q.embedding <#> %b) AS dist FROM rag_questions q{join} "
        f"WHERE {where} GROUP BY q.doc_pk ORDER BY dist, q.doc_pk LIMIT %s",
        [vector, *flt_params, depth],
    )
    return [(int(r[0]), -float(r[1])) for r in await cur.fetchall()]


async def best_chunks(
    conn: AsyncConnection, row: CollectionRow, vector: np.ndarray, doc_pks: list[int]
) -> dict[int, tuple[int, float]]:
    """``{document pk: (chunk id, score)}``: each document's chunk nearest to ``vector``."""
    if not doc_pks:
        return {}
    cur = await conn.execute(
        "SELECT DISTINCT ON (c.doc_pk) c.doc_pk, c.id, c.embedding <#> %b AS dist "
        f"FROM rag_chunks c WHERE c.collection_id = {int(row.id)} AND c.doc_pk = ANY(%s) "
        "ORDER BY c.doc_pk, dist, c.id",
        [vector, doc_pks],
    )
    return {int(r[0]): (int(r[1]), -float(r[2])) for r in await cur.fetchall()}


async def hydrate(conn: AsyncConnection, row: CollectionRow, ids: list[int]) -> dict[int, Hit]:
    """The chunk rows (with their document's id and metadata) for ``ids``."""
    if not ids:
        return {}
    cur = await conn.execute(
        'SELECT c.id, d.id, c.text, d.metadata, c.position, c.start, c."end" '
        "FROM rag_chunks c JOIN rag_documents d ON d.pk = c.doc_pk "
        f"WHERE c.collection_id = {int(row.id)} AND c.id = ANY(%s)",
        [ids],
    )
    return {
        int(r[0]): Hit(int(r[0]), r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]))
        for r in await cur.fetchall()
    }
