"""One live collection of the postgres engine: writes in one transaction, reads, search.

Every write takes, in this order: a KEY SHARE lock on the collection's row (a concurrent drop
waits for it, and it fails with :class:`CollectionGone` once the collection is dropped), one
transaction-level advisory lock per document id (sorted, so two batches never deadlock; two
replicas writing one id run one after the other, and the second sees the first's result), and
last the collection row itself to move its counters. Statuses are decided inside the
transaction, against what is committed then: same content hash and same canonical metadata:
``unchanged``; same text, other metadata: ``updated`` with the chunks kept; new text: the old
chunks out and the new ones in (``updated``), or ``created``. A document's known questions
(``rag_questions``) are replaced in the same transaction when the write brings other ones,
and kept when it brings none.
"""

from __future__ import annotations

import builtins
import hashlib
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from psycopg import AsyncConnection
from psycopg import errors as pg_errors

from indexes.engine import CollectionGone, StaleWrite
from indexes.postgres.reindex import check_model
from indexes.postgres.search import (
    best_chunks,
    collection_state,
    count_matching,
    dense_ranking,
    hydrate,
    question_ranking,
    sparse_ranking,
)
from indexes.postgres.sql import EF_SEARCH_MAX, IndexSpec, compile_filter, parse_index
from indexes.questions import QuestionsOutcome, QuestionWrite, lift_by_questions, new_questions
from indexes.reindex import ModelChanged
from indexes.types import (
    CollectionRow,
    DocumentRow,
    DocumentWrite,
    Ranking,
    ScoredHit,
    SearchQuery,
    WriteOutcome,
    canonical_json,
    fuse,
)

if TYPE_CHECKING:
    from indexes.postgres.engine import PostgresEngine

__all__ = ["PostgresCollection", "apply_writes", "check_storable"]


_TIMES = "extract(epoch FROM created_at)::float8, extract(epoch FROM updated_at)::float8"
_DOC_COLS = f"id, text, metadata, content_hash, chunks, {_TIMES}"
_LIST_COLS = f"id, '', metadata, content_hash, chunks, {_TIMES}"  # a listing carries no text


def _lock_key(collection_id: int, doc_id: str) -> int:
    digest = hashlib.blake2b(f"{collection_id}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _nul_free(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, dict):
        return all(_nul_free(k) and _nul_free(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_nul_free(v) for v in value)
    return True


def check_storable(writes: Sequence[DocumentWrite]) -> None:
    """ValueError for what PostgreSQL cannot store (NUL characters in text or metadata) or a
    malformed write, before a transaction starts."""
    seen: set[str] = set()
    for w in writes:
        if w.id in seen:
            raise ValueError(f"document id {w.id!r} appears twice in one upsert")
        seen.add(w.id)
        texts = [w.id, w.text, *(c.text for c in w.chunks or ()), *(w.questions or ())]
        if not all(_nul_free(t) for t in texts) or not _nul_free(w.metadata):
            raise ValueError(f"document {w.id!r}: PostgreSQL cannot store NUL (U+0000) characters")
        if w.chunks is not None:
            n = 0 if w.vectors is None else len(w.vectors)
            if w.vectors is None or np.ndim(w.vectors) != 2 or n != len(w.chunks):
                raise ValueError(
                    f"document {w.id!r}: {len(w.chunks)} chunks need as many vectors, got {n}"
                )
        if w.questions is not None and w.question_vectors is not None:
            n = len(w.question_vectors)
            if np.ndim(w.question_vectors) != 2 or n != len(w.questions):
                raise ValueError(
                    f"document {w.id!r}: {len(w.questions)} questions need as many vectors, got {n}"
                )


async def lock_collection(conn: AsyncConnection, row: CollectionRow) -> None:
    """KEY SHARE lock on the collection's row for this transaction; CollectionGone if it was
    dropped."""
    cur = await conn.execute("SELECT 1 FROM rag_collections WHERE id = %s FOR KEY SHARE", (row.id,))
    if await cur.fetchone() is None:
        raise CollectionGone(f"collection {row.name!r} no longer exists")


async def apply_writes(
    conn: AsyncConnection, row: CollectionRow, writes: Sequence[DocumentWrite]
) -> tuple[WriteOutcome, int, int, int]:
    """Apply ``writes`` inside the caller's transaction (the collection row already locked);
    returns the outcome and the collection's new (documents, chunks, questions) counters."""
    cid = int(row.id)
    outcome = WriteOutcome()
    keys = sorted({_lock_key(cid, w.id) for w in writes})
    await conn.execute(
        "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) WITH ORDINALITY t(k, n) "
        "ORDER BY n",
        (keys,),
    )
    cur = await conn.execute(
        "SELECT id, pk, content_hash, metadata, chunks FROM rag_documents "
        "WHERE collection_id = %s AND id = ANY(%s)",
        (cid, [w.id for w in writes]),
    )
    old = {r[0]: (int(r[1]), r[2], canonical_json(r[3]), int(r[4])) for r in await cur.fetchall()}
    stored = await stored_questions(
        conn, cid, [old[w.id][0] for w in writes if w.questions is not None and w.id in old]
    )
    metadata_only: list[tuple[int, str]] = []
    replaced: list[tuple[int, DocumentWrite, str]] = []
    created: list[tuple[DocumentWrite, str]] = []
    new_questions: list[DocumentWrite] = []
    doc_delta = chunk_delta = 0
    for w in writes:
        meta = canonical_json(w.metadata)
        prev = old.get(w.id)
        asks = w.questions is not None and w.questions != stored.get(prev[0] if prev else -1, [])
        if asks:
            if w.question_vectors is None:
                raise StaleWrite(f"questions of document {w.id!r} changed concurrently; retry")
            new_questions.append(w)
        if prev is not None and prev[1] == w.content_hash and prev[2] == meta and not asks:
            outcome.statuses[w.id] = "unchanged"
            outcome.chunk_counts[w.id] = prev[3]
        elif prev is not None and prev[1] == w.content_hash:
            # Same text: chunks and vectors stay (metadata or questions change).
            metadata_only.append((prev[0], meta))
            outcome.statuses[w.id] = "updated"
            outcome.chunk_counts[w.id] = prev[3]
        elif w.chunks is None:
            # The caller skipped embedding because the text looked unchanged, but another
            # writer changed or removed the document since: the caller retries.
            raise StaleWrite(f"document {w.id!r} changed concurrently; retry")
        elif prev is not None:
            replaced.append((prev[0], w, meta))
            outcome.statuses[w.id] = "updated"
            outcome.chunk_counts[w.id] = len(w.chunks)
            chunk_delta += len(w.chunks)
        else:
            created.append((w, meta))
            outcome.statuses[w.id] = "created"
            outcome.chunk_counts[w.id] = len(w.chunks)
            doc_delta += 1
            chunk_delta += len(w.chunks)
    if metadata_only:
        await conn.execute(
            "UPDATE rag_documents d SET metadata = u.meta::jsonb, updated_at = now() "
            "FROM unnest(%s::bigint[], %s::text[]) AS u(pk, meta) WHERE d.pk = u.pk",
            ([pk for pk, _ in metadata_only], [m for _, m in metadata_only]),
        )
    pks: dict[str, int] = {}
    if replaced:
        cur = await conn.execute(
            f"DELETE FROM rag_chunks WHERE collection_id = {cid} AND doc_pk = ANY(%s)",
            ([pk for pk, _, _ in replaced],),
        )
        chunk_delta -= cur.rowcount
        await conn.execute(
            "UPDATE rag_documents d SET text = u.text, metadata = u.meta::jsonb, "
            "content_hash = u.hash, chunks = u.chunks, updated_at = now() "
            "FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::int[]) "
            "AS u(pk, text, meta, hash, chunks) WHERE d.pk = u.pk",
            (
                [pk for pk, _, _ in replaced],
                [w.text for _, w, _ in replaced],
                [m for _, _, m in replaced],
                [w.content_hash for _, w, _ in replaced],
                [len(w.chunks or ()) for _, w, _ in replaced],
            ),
        )
        pks.update({w.id: pk for pk, w, _ in replaced})
    if created:
        cur = await conn.execute(
            "INSERT INTO rag_documents (collection_id, id, text, metadata, content_hash, "
            "chunks, created_at, updated_at) "
            "SELECT %s, u.id, u.text, u.meta::jsonb, u.hash, u.chunks, now(), now() "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::int[]) "
            "AS u(id, text, meta, hash, chunks) RETURNING id, pk",
            (
                cid,
                [w.id for w, _ in created],
                [w.text for w, _ in created],
                [m for _, m in created],
                [w.content_hash for w, _ in created],
                [len(w.chunks or ()) for w, _ in created],
            ),
        )
        pks.update({r[0]: int(r[1]) for r in await cur.fetchall()})
    fresh = [w for _, w, _ in replaced] + [w for w, _ in created]
    if any(w.chunks for w in fresh):
        await _copy_chunks(conn, row, fresh, pks)
    question_delta = 0
    if new_questions:
        pks.update({w.id: old[w.id][0] for w in new_questions if w.id not in pks})
        question_delta = await _replace_questions(conn, row, new_questions, pks)
    cur = await conn.execute(
        "UPDATE rag_collections SET documents = documents + %s, chunks = chunks + %s, "
        "questions = questions + %s WHERE id = %s RETURNING documents, chunks, questions",
        (doc_delta, chunk_delta, question_delta, cid),
    )
    counters = await cur.fetchone()
    if counters is None:
        raise CollectionGone(f"collection {row.name!r} no longer exists")
    return outcome, int(counters[0]), int(counters[1]), int(counters[2])


async def stored_questions(
    conn: AsyncConnection, collection_id: int, doc_pks: builtins.list[int]
) -> dict[int, builtins.list[str]]:
    """``{document pk: its questions in stored order}`` for those of ``doc_pks`` with any."""
    if not doc_pks:
        return {}
    cur = await conn.execute(
        "SELECT doc_pk, array_agg(text ORDER BY id) FROM rag_questions "
        "WHERE collection_id = %s AND doc_pk = ANY(%s) GROUP BY doc_pk",
        (collection_id, doc_pks),
    )
    return {int(r[0]): list(r[1]) for r in await cur.fetchall()}


async def _replace_questions(
    conn: AsyncConnection,
    row: CollectionRow,
    docs: builtins.list[DocumentWrite],
    pks: dict[str, int],
) -> int:
    """Swap the stored questions of ``docs`` for theirs; the change in the question count."""
    cur = await conn.execute(
        "DELETE FROM rag_questions WHERE collection_id = %s AND doc_pk = ANY(%s)",
        (row.id, [pks[w.id] for w in docs]),
    )
    removed = cur.rowcount
    rows = [
        (pks[w.id], text, vec)
        for w in docs
        for text, vec in zip(w.questions or (), _vectors(row, w.question_vectors), strict=True)
    ]
    await _insert_questions(conn, row, rows)
    return len(rows) - removed


def _vectors(row: CollectionRow, vectors: np.ndarray | None) -> np.ndarray:
    """Question vectors as float32 rows of the collection's dimension (ValueError if not)."""
    out = np.ascontiguousarray(
        vectors if vectors is not None else np.zeros((0, row.dimension)), dtype=np.float32
    )
    if out.ndim != 2 or (len(out) and out.shape[1] != row.dimension):
        raise ValueError(
            f"collection {row.name!r} holds vectors of dimension {row.dimension}; "
            f"got question vectors of shape {out.shape}"
        )
    return out


async def _insert_questions(
    conn: AsyncConnection, row: CollectionRow, rows: builtins.list[tuple[int, str, np.ndarray]]
) -> None:
    """COPY (binary) ``(document pk, text, vector)`` rows into ``rag_questions``."""
    if not rows:
        return
    async with conn.cursor().copy(
        "COPY rag_questions (collection_id, doc_pk, text, embedding) FROM STDIN (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["int8", "int8", "text", "vector"])
        for doc_pk, text, vec in rows:
            await copy.write_row((int(row.id), doc_pk, text, vec))


async def _copy_chunks(
    conn: AsyncConnection, row: CollectionRow, docs: list[DocumentWrite], pks: dict[str, int]
) -> None:
    """COPY (binary) the chunks and vectors of ``docs`` into the collection's partition."""
    cid = int(row.id)
    try:
        async with conn.cursor().copy(
            'COPY rag_chunks (collection_id, doc_pk, position, start, "end", text, embedding) '
            "FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "int8", "int4", "int4", "int4", "text", "vector"])
            for w in docs:
                assert w.chunks is not None and w.vectors is not None
                pk = pks[w.id]
                vectors = np.ascontiguousarray(w.vectors, dtype=np.float32)
                for chunk, vec in zip(w.chunks, vectors, strict=True):
                    await copy.write_row(
                        (cid, pk, chunk.position, chunk.start, chunk.end, chunk.text, vec)
                    )
    except pg_errors.CheckViolation as exc:
        if (exc.diag.constraint_name or "").endswith("_dims"):
            got = {np.shape(w.vectors)[-1] for w in docs if w.vectors is not None}
            raise ValueError(
                f"collection {row.name!r} holds vectors of dimension {row.dimension}; "
                f"got dimension {', '.join(str(g) for g in sorted(got))}"
            ) from exc
        raise


class PostgresCollection:
    """A :class:`~indexes.engine.Collection` whose state lives in the database."""

    def __init__(self, engine: PostgresEngine, row: CollectionRow) -> None:
        self._engine = engine
        self._row = row
        try:
            self._spec = parse_index(row.index_factory, row.dimension)
        except ValueError:  # a row written by another version: search it exactly
            self._spec = IndexSpec(hnsw=False)

    @property
    def row(self) -> CollectionRow:
        return self._row

    @property
    def index(self) -> IndexSpec:
        return self._spec

    def _refresh(self, row: CollectionRow) -> None:
        self._row = row

    def _gone(self) -> CollectionGone:
        self._engine._forget(self)
        return CollectionGone(f"collection {self._row.name!r} no longer exists")

    async def _check_alive(self, conn: AsyncConnection) -> None:
        cur = await conn.execute("SELECT 1 FROM rag_collections WHERE id = %s", (self._row.id,))
        if await cur.fetchone() is None:
            raise self._gone()

    # ---- writes ------------------------------------------------------------------------
    async def upsert(
        self, writes: Sequence[DocumentWrite], *, model: str | None = None
    ) -> WriteOutcome:
        check_storable(writes)
        if not writes:
            return WriteOutcome()
        row = self._row

        async def body(conn: AsyncConnection) -> tuple[WriteOutcome, int, int, int]:
            await lock_collection(conn, row)
            if model is not None:
                await check_model(conn, self, model)
            return await apply_writes(conn, row, writes)

        try:
            outcome, documents, chunks, questions = await self._engine._write(body)
        except CollectionGone:
            raise self._gone() from None
        self._row = replace(self._row, documents=documents, chunks=chunks, questions=questions)
        return outcome

    async def add_questions(
        self, writes: Sequence[QuestionWrite], *, limit: int, model: str | None = None
    ) -> QuestionsOutcome:
        row = self._row
        if any("\x00" in t for w in writes for t in w.questions):
            raise ValueError("PostgreSQL cannot store NUL (U+0000) characters")

        async def body(conn: AsyncConnection) -> tuple[QuestionsOutcome, int | None]:
            await lock_collection(conn, row)
            if model is not None:
                await check_model(conn, self, model)
            cid = int(row.id)
            keys = sorted({_lock_key(cid, w.document_id) for w in writes})
            await conn.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) WITH ORDINALITY "
                "t(k, n) ORDER BY n",
                (keys,),
            )
            cur = await conn.execute(
                "SELECT id, pk FROM rag_documents WHERE collection_id = %s AND id = ANY(%s)",
                (cid, [w.document_id for w in writes]),
            )
            pks = {r[0]: int(r[1]) for r in await cur.fetchall()}
            stored = await stored_questions(conn, cid, list(pks.values()))
            outcome = QuestionsOutcome()
            rows: builtins.list[tuple[int, str, np.ndarray]] = []
            for w in writes:
                pk = pks.get(w.document_id)
                if pk is None:
                    outcome.missing.append(w.document_id)
                    continue
                have = stored.get(pk, [])
                vectors = _vectors(row, w.vectors)
                keep = new_questions(have, w.questions)  # compared by their normalised keys
                outcome.added[w.document_id] = len(keep)
                outcome.totals[w.document_id] = len(have) + len(keep)
                if len(have) + len(keep) > limit:
                    outcome.over_limit.append(w.document_id)
                rows.extend((pk, w.questions[i], vectors[i]) for i in keep)
            if not outcome.written or not rows:
                return outcome, None
            await _insert_questions(conn, row, rows)
            await conn.execute(
                "UPDATE rag_documents SET updated_at = now() WHERE pk = ANY(%s)",
                (sorted({pk for pk, _, _ in rows}),),
            )
            cur = await conn.execute(
                "UPDATE rag_collections SET questions = questions + %s WHERE id = %s "
                "RETURNING questions",
                (len(rows), cid),
            )
            counter = await cur.fetchone()
            return outcome, None if counter is None else int(counter[0])

        try:
            outcome, questions = await self._engine._write(body)
        except CollectionGone:
            raise self._gone() from None
        if questions is not None:
            self._row = replace(self._row, questions=questions)
        return outcome

    async def delete(self, doc_id: str) -> bool:
        row = self._row

        async def body(conn: AsyncConnection) -> tuple[int, int, int] | None:
            await lock_collection(conn, row)
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", (_lock_key(int(row.id), doc_id),)
            )
            cur = await conn.execute(
                "DELETE FROM rag_questions WHERE collection_id = %s AND doc_pk = "
                "(SELECT pk FROM rag_documents WHERE collection_id = %s AND id = %s)",
                (row.id, row.id, doc_id),
            )
            questions = cur.rowcount
            cur = await conn.execute(
                "DELETE FROM rag_documents WHERE collection_id = %s AND id = %s RETURNING pk",
                (row.id, doc_id),
            )
            found = await cur.fetchone()
            if found is None:
                return None
            cur = await conn.execute(
                f"DELETE FROM rag_chunks WHERE collection_id = {int(row.id)} AND doc_pk = %s",
                (found[0],),
            )
            cur = await conn.execute(
                "UPDATE rag_collections SET documents = documents - 1, chunks = chunks - %s, "
                "questions = questions - %s WHERE id = %s RETURNING documents, chunks, questions",
                (cur.rowcount, questions, row.id),
            )
            counters = await cur.fetchone()
            assert counters is not None
            return int(counters[0]), int(counters[1]), int(counters[2])

        try:
            counters = await self._engine._write(body)
        except CollectionGone:
            raise self._gone() from None
        if counters is None:
            return False
        self._row = replace(
            self._row, documents=counters[0], chunks=counters[1], questions=counters[2]
        )
        return True

    # ---- reads -------------------------------------------------------------------------
    async def existing(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        if not ids:
            return {}
        async with self._engine._connection() as conn:
            cur = await conn.execute(
                "SELECT id, content_hash, metadata FROM rag_documents "
                "WHERE collection_id = %s AND id = ANY(%s)",
                (self._row.id, list(ids)),
            )
            return {r[0]: (r[1], canonical_json(r[2])) for r in await cur.fetchall()}

    async def questions(self, ids: Sequence[str]) -> dict[str, builtins.list[str]]:
        if not ids:
            return {}
        async with self._engine._connection() as conn:
            cur = await conn.execute(
                "SELECT d.id, array_agg(q.text ORDER BY q.id) FROM rag_questions q "
                "JOIN rag_documents d ON d.pk = q.doc_pk "
                "WHERE q.collection_id = %s AND d.collection_id = %s AND d.id = ANY(%s) "
                "GROUP BY d.id",
                (self._row.id, self._row.id, list(ids)),
            )
            return {r[0]: list(r[1]) for r in await cur.fetchall()}

    async def texts(self, ids: Sequence[str]) -> dict[str, str]:
        """``{id: text}`` for those of ``ids`` stored (:class:`~indexes.engine.DocumentTexts`)."""
        if not ids:
            return {}
        async with self._engine._connection() as conn:
            cur = await conn.execute(
                "SELECT id, text FROM rag_documents WHERE collection_id = %s AND id = ANY(%s)",
                (self._row.id, list(ids)),
            )
            return {r[0]: r[1] for r in await cur.fetchall()}

    async def get(self, doc_id: str) -> DocumentRow | None:
        async with self._engine._connection() as conn:
            cur = await conn.execute(
                f"SELECT {_DOC_COLS} FROM rag_documents WHERE collection_id = %s AND id = %s",
                (self._row.id, doc_id),
            )
            r = await cur.fetchone()
            if r is None:
                await self._check_alive(conn)
                return None
            return DocumentRow(r[0], r[1], r[2], r[3], int(r[4]), float(r[5]), float(r[6]))

    async def list(
        self, *, limit: int, after: str | None, prefix: str = ""
    ) -> tuple[list[DocumentRow], bool]:
        async with self._engine._connection() as conn:
            cur = await conn.execute(
                f"SELECT {_LIST_COLS} FROM rag_documents "
                "WHERE collection_id = %s AND id > %s AND id >= %s AND starts_with(id, %s) "
                "ORDER BY id LIMIT %s",
                (self._row.id, after or "", prefix, prefix, limit + 1),
            )
            rows = await cur.fetchall()
            if not rows:
                await self._check_alive(conn)
        docs = [
            DocumentRow(r[0], r[1], r[2], r[3], int(r[4]), float(r[5]), float(r[6]))
            for r in rows[:limit]
        ]
        return docs, len(rows) > limit

    # ---- search ------------------------------------------------------------------------
    async def search(
        self, query: SearchQuery, timings: dict[str, float] | None = None
    ) -> builtins.list[ScoredHit]:
        """Dense: the ``top_k`` nearest chunks (HNSW or exact). Hybrid: dense and BM25-like
        rankings ``max(top_k * 4, 50)`` deep, fused by :func:`~indexes.types.fuse`.
        ``min_score`` applies to the dense similarity. One read-only snapshot for all of it,
        whose first statement checks that the collection still records the query's embedding
        model and whether it holds any known question (the questions are scored only then:
        an EXISTS in the database, since this replica's cached counter may be stale)."""
        timings = timings if timings is not None else {}
        row = self._row
        if query.embedding_model not in (None, row.embedding_model):
            raise ModelChanged(f"collection {row.name!r} is embedded with {row.embedding_model}")
        vector = np.ascontiguousarray(query.vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != row.dimension:
            raise ValueError(
                f"the query vector has dimension {vector.shape[0]}; collection {row.name!r} "
                f"holds dimension {row.dimension}"
            )
        depth = query.top_k if query.mode == "dense" else max(query.top_k * 4, 50)
        flt_sql, flt_params = compile_filter(query.filter)
        async with self._engine._connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            model, questions = await collection_state(conn, row)
            if query.embedding_model not in (None, model):
                await check_model(conn, self, query.embedding_model)  # raises ModelChanged
            t = time.perf_counter()
            dense = await self._dense(conn, vector, depth, flt_sql, flt_params, timings)
            timings["dense"] = _ms(t)
            lifted: dict[int, dict[str, float]] = {}
            if questions:
                t = time.perf_counter()
                dense, lifted = await self._with_questions(
                    conn, vector, dense, depth, flt_sql, flt_params
                )
                timings["questions"] = _ms(t)
            if query.min_score is not None:
                dense = [(cid, s) for cid, s in dense if s >= query.min_score]
            if query.mode == "hybrid":
                t = time.perf_counter()
                sparse = await sparse_ranking(conn, row, query.text, depth, flt_sql, flt_params)
                timings["bm25"] = _ms(t)
                fused, parts = fuse(dense, sparse, alpha=query.alpha, fusion=query.fusion)
                ranked = fused[: query.top_k]
            else:
                ranked = dense[: query.top_k]
                parts = {cid: {"dense": score} for cid, score in ranked}
            for cid, extra in lifted.items():
                if cid in parts:
                    parts[cid].update(extra)
            t = time.perf_counter()
            hits = await hydrate(conn, row, [cid for cid, _ in ranked])
            timings["hydrate"] = _ms(t)
            if not hits:
                await self._check_alive(conn)
        return [ScoredHit(hits[cid], score, parts[cid]) for cid, score in ranked if cid in hits]

    async def _with_questions(
        self,
        conn: AsyncConnection,
        vector: np.ndarray,
        dense: Ranking,
        depth: int,
        flt_sql: str,
        flt_params: builtins.list[Any],
    ) -> tuple[Ranking, dict[int, dict[str, float]]]:
        """The dense chunk ranking merged with the known questions (the union of both keys,
        :func:`~indexes.questions.lift_by_questions`), ``depth`` deep. The ``depth`` documents
        with the best questions are enough: a document past them cannot outrank the ``depth``
        best chunks they bring."""
        questions = await question_ranking(conn, self._row, vector, depth, flt_sql, flt_params)
        if not questions:
            return dense, {}
        best = await best_chunks(conn, self._row, vector, [pk for pk, _ in questions])
        ranking, lifted = lift_by_questions(dense, dict(questions), best)
        return ranking[:depth], lifted

    async def _dense(
        self,
        conn: AsyncConnection,
        vector: np.ndarray,
        depth: int,
        flt_sql: str,
        flt_params: builtins.list[Any],
        timings: dict[str, float],
    ) -> builtins.list[tuple[int, float]]:
        """The dense ranking, ``depth`` deep whenever that many chunks pass the filter.

        pgvector's HNSW scan (0.6: no iterative scans) yields at most ``hnsw.ef_search``
        candidates and the filter applies after it, so a selective filter can leave fewer
        than ``depth``. When that happens and the filter lets more through: if fewer than
        ``exact_scan_below`` chunks pass, they are ranked exactly (cheap for a small set,
        ``timings["exact_fallback"]``); otherwise the scan is repeated with ef_search at its
        maximum (``timings["wide_search"]``), and ranked exactly only if still short.
        """
        row, spec, engine = self._row, self._spec, self._engine
        if not spec.hnsw:
            return await dense_ranking(
                conn, row, spec, vector, depth, flt_sql, flt_params, exact=True
            )
        ef = min(EF_SEARCH_MAX, max(engine.ef_search, depth))
        await conn.execute(f"SET LOCAL hnsw.ef_search = {int(ef)}")
        dense = await dense_ranking(
            conn, row, spec, vector, depth, flt_sql, flt_params, exact=False
        )
        if len(dense) >= depth:
            return dense
        t = time.perf_counter()
        cap = max(engine.exact_scan_below, depth)
        passing = await count_matching(conn, row, flt_sql, flt_params, cap)
        if passing <= len(dense):
            return dense  # all there is
        if passing >= cap and ef < EF_SEARCH_MAX:
            await conn.execute(f"SET LOCAL hnsw.ef_search = {EF_SEARCH_MAX}")
            wide = await dense_ranking(
                conn, row, spec, vector, depth, flt_sql, flt_params, exact=False
            )
            timings["wide_search"] = _ms(t)
            if len(wide) >= depth:
                return wide
        t = time.perf_counter()
        dense = await dense_ranking(conn, row, spec, vector, depth, flt_sql, flt_params, exact=True)
        timings["exact_fallback"] = _ms(t)
        return dense


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
