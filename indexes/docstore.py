"""The durable document store: SQLite in WAL mode, the source of truth.

Tables: ``collections`` (options, the embedding model that owns them, counters),
``documents`` (id, text, metadata JSON, content hash, timestamps), ``chunks`` (text, position,
character span, float32 embedding), ``chunks_fts`` (FTS5 over chunk text, kept in step by
triggers, for BM25) and ``questions`` (a document's known questions and their embeddings, index
ids offset by ``indexes.questions.QUESTION_ID_OFFSET``). Every upsert is one transaction; the
index is updated from what it wrote.

Writes go through one writer connection (callers serialise them on one thread); reads use one
connection per thread. WAL lets readers run while a writer holds its transaction.

The reindex tables (``reindex_jobs``, ``reindex_vectors``, migration 4) are read and written by
:mod:`indexes.reindex_embedded` through :meth:`DocumentStore.begin` and
:meth:`DocumentStore.query`.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexes.engine import StaleWrite
from indexes.questions import QUESTION_ID_OFFSET, QuestionsOutcome, QuestionWrite, new_questions
from indexes.stopwords import content_words
from indexes.types import (
    CollectionOptions,
    CollectionRow,
    DocumentRow,
    DocumentWrite,
    Hit,
    MetadataFilter,
    canonical_json,
)

__all__ = [
    "DocumentStore",
    "StagedWrite",
    "filter_sql",
]

# The schema as version 1 made it; each later version is one migration below.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    embedding_model TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    index_factory TEXT NOT NULL,
    chunk_tokens INTEGER NOT NULL,
    chunk_overlap INTEGER NOT NULL,
    documents INTEGER NOT NULL DEFAULT 0,
    chunks INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    pk INTEGER PRIMARY KEY,
    collection_id INTEGER NOT NULL REFERENCES collections(id),
    id TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    chunks INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (collection_id, id)
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL,
    doc_pk INTEGER NOT NULL REFERENCES documents(pk),
    position INTEGER NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_pk);
CREATE INDEX IF NOT EXISTS chunks_by_collection ON chunks(collection_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='id', tokenize='porter unicode61'
);
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
"""

# (version, what it adds, SQL): applied in order, each in its own transaction, to a store whose
# ``PRAGMA user_version`` is older.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        2,
        "per-collection search defaults",
        "ALTER TABLE collections ADD COLUMN search_defaults TEXT NOT NULL DEFAULT '{}';",
    ),
    (
        3,
        "known questions as extra keys of documents",
        # AUTOINCREMENT: a question id is never reused, as FAISS (HNSW tombstones) requires.
        """
CREATE TABLE questions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL,
    doc_pk INTEGER NOT NULL REFERENCES documents(pk),
    text TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX questions_by_doc ON questions(doc_pk);
CREATE INDEX questions_by_collection ON questions(collection_id);
ALTER TABLE collections ADD COLUMN questions INTEGER NOT NULL DEFAULT 0;
""",
    ),
    (
        4,
        "reindex jobs and their shadow vectors (see indexes.reindex_embedded)",
        """
CREATE TABLE reindex_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    embedding_model TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    source_model TEXT NOT NULL,
    state TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX reindex_jobs_by_collection ON reindex_jobs(collection_id);
CREATE TABLE reindex_vectors (
    key INTEGER PRIMARY KEY,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL
);
CREATE INDEX reindex_vectors_by_collection ON reindex_vectors(collection_id);
""",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_WORD = re.compile(r"\w+", re.UNICODE)
_SQL_VARS = 900


def filter_sql(flt: MetadataFilter) -> tuple[str, tuple[Any, ...]]:
    """The filter as an SQLite condition on ``d.metadata`` (documents aliased ``d``)."""
    clauses: list[str] = []
    params: list[Any] = []
    for cond in flt.conditions:
        expr = f"json_extract(d.metadata, '$.\"{cond.key}\"')"
        if len(cond.values) == 1:
            clauses.append(f"{expr} = ?")
        else:
            clauses.append(f"{expr} IN ({','.join('?' * len(cond.values))})")
        params.extend(cond.values)
    return " AND ".join(clauses), tuple(params)


@dataclass(slots=True)
class StagedWrite:
    """An open write transaction; ``commit`` makes it durable, ``rollback`` discards it."""

    conn: sqlite3.Connection
    lock: threading.Lock
    removed: list[int] = field(default_factory=list)
    added_ids: list[int] = field(default_factory=list)
    added_vectors: list[np.ndarray] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    chunk_counts: dict[str, int] = field(default_factory=dict)
    question_delta: int = 0  # questions added minus removed
    done: bool = False

    def commit(self) -> None:
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self._finish(rollback=True)  # a COMMIT that failed leaves the transaction open
            raise
        self._finish(rollback=False)

    def rollback(self) -> None:
        if not self.done:
            self._finish(rollback=True)

    def _finish(self, *, rollback: bool) -> None:
        # Only a transaction that began (and that SQLite did not end itself) is rolled back:
        # after a BEGIN that timed out, ROLLBACK would fail and hide the real error.
        try:
            if rollback and self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        finally:
            self.done = True
            self.lock.release()

    @property
    def vectors(self) -> np.ndarray:
        return np.concatenate(self.added_vectors) if self.added_vectors else np.zeros((0, 0))


class DocumentStore:
    def __init__(
        self, path: Path, *, synchronous: str = "FULL", busy_timeout_ms: int = 30_000
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._writer = self._connect()
        self._migrate()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    def _migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION`: version 1's tables, then each newer
        migration in its own transaction (a crash between two leaves a consistent version)."""
        w = self._writer
        version = w.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than the {SCHEMA_VERSION} this "
                "version of rag-service understands: upgrade rag-service"
            )
        if version == 0:
            w.executescript(_SCHEMA)
            w.execute("PRAGMA user_version = 1")
        for number, _, sql in MIGRATIONS:
            if number <= version:
                continue
            w.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, sql.split(";")):
                    w.execute(statement)
                w.execute(f"PRAGMA user_version = {number}")
                w.execute("COMMIT")
            except BaseException:
                w.execute("ROLLBACK")
                raise

    def _connect(self) -> sqlite3.Connection:
        # How long a statement waits for another connection's lock before SQLite gives up
        # with "database is locked" (the engine answers that as busy: retry shortly).
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self._busy_timeout_ms / 1000,
        )
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @property
    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def begin(self) -> StagedWrite:
        """An open write transaction (``BEGIN IMMEDIATE``) on the writer connection,
        ``staged.conn``, for changes made outside this module (reindexing); the caller commits
        or rolls back."""
        self._write_lock.acquire()
        staged = StagedWrite(self._writer, self._write_lock)
        try:
            self._writer.execute("BEGIN IMMEDIATE")
        except BaseException:
            staged.rollback()
            raise
        return staged

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one read-only statement, on this thread's reader connection."""
        return self._reader.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._write_lock:
            self._writer.close()

    # ---- collections -------------------------------------------------------------------
    _COLLECTION_COLS = (
        "id, name, embedding_model, dimension, index_factory, chunk_tokens, "
        "chunk_overlap, documents, chunks, created_at, search_defaults, questions"
    )

    def get_collection(self, name: str) -> CollectionRow | None:
        row = self._reader.execute(
            f"SELECT {self._COLLECTION_COLS} FROM collections WHERE name = ?", (name,)
        ).fetchone()
        return _collection_row(row) if row else None

    def list_collections(self) -> list[CollectionRow]:
        rows = self._reader.execute(
            f"SELECT {self._COLLECTION_COLS} FROM collections ORDER BY name"
        ).fetchall()
        return [_collection_row(r) for r in rows]

    def create_collection(
        self, options: CollectionOptions, *, conn: sqlite3.Connection | None = None
    ) -> CollectionRow | None:
        """Insert a collection; None when the name is taken."""
        sql = (
            "INSERT INTO collections (name, embedding_model, dimension, index_factory, "
            "chunk_tokens, chunk_overlap, created_at, search_defaults) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO NOTHING"
        )
        now = time.time()
        args = (
            options.name,
            options.embedding_model,
            options.dimension,
            options.index,
            options.chunk_tokens,
            options.chunk_overlap,
            now,
            canonical_json(options.search),
        )
        if conn is not None:
            cur = conn.execute(sql, args)
        else:
            with self._write_lock:
                cur = self._writer.execute(sql, args)
        if cur.rowcount == 0:
            return None
        return CollectionRow.of(options, id=int(cur.lastrowid or 0), created_at=now)

    def set_search_defaults(self, name: str, defaults: dict[str, Any]) -> CollectionRow | None:
        """Replace a collection's search defaults; its row after, or None when it is gone."""
        with self._write_lock:
            self._writer.execute(
                "UPDATE collections SET search_defaults = ? WHERE name = ?",
                (canonical_json(defaults), name),
            )
        return self.get_collection(name)

    def delete_collection(self, collection_id: int) -> None:
        with self._write_lock:
            w = self._writer
            w.execute("BEGIN IMMEDIATE")
            try:
                w.execute("DELETE FROM chunks WHERE collection_id = ?", (collection_id,))
                w.execute("DELETE FROM questions WHERE collection_id = ?", (collection_id,))
                w.execute("DELETE FROM documents WHERE collection_id = ?", (collection_id,))
                w.execute("DELETE FROM collections WHERE id = ?", (collection_id,))
                w.execute("COMMIT")
            except BaseException:
                if w.in_transaction:
                    w.execute("ROLLBACK")
                raise

    # ---- documents ---------------------------------------------------------------------
    def existing(self, collection_id: int, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``{id: (content_hash, canonical metadata json)}`` for the ids that exist."""
        out: dict[str, tuple[str, str]] = {}
        for part in _batches(list(ids)):
            rows = self._reader.execute(
                f"SELECT id, content_hash, metadata FROM documents WHERE collection_id = ? "
                f"AND id IN ({','.join('?' * len(part))})",
                (collection_id, *part),
            ).fetchall()
            out.update({r[0]: (r[1], r[2]) for r in rows})
        return out

    def get_document(self, collection_id: int, doc_id: str) -> DocumentRow | None:
        row = self._reader.execute(
            "SELECT id, text, metadata, content_hash, chunks, created_at, updated_at "
            "FROM documents WHERE collection_id = ? AND id = ?",
            (collection_id, doc_id),
        ).fetchone()
        if row is None:
            return None
        return DocumentRow(row[0], row[1], json.loads(row[2]), *row[3:])

    def document_texts(self, collection_id: int, ids: Sequence[str]) -> dict[str, str]:
        """``{id: text}`` for those of ``ids`` that exist (a bulk read, by batches)."""
        out: dict[str, str] = {}
        for part in _batches(list(ids)):
            rows = self._reader.execute(
                f"SELECT id, text FROM documents WHERE collection_id = ? "
                f"AND id IN ({','.join('?' * len(part))})",
                (collection_id, *part),
            ).fetchall()
            out.update({r[0]: r[1] for r in rows})
        return out

    def list_documents(
        self, collection_id: int, *, limit: int, after: str | None, prefix: str = ""
    ) -> tuple[list[DocumentRow], bool]:
        # ids compare as UTF-8 bytes (SQLite's BINARY collation): the ids that start with
        # ``prefix`` are a range of the (collection_id, id) index from ``prefix`` on.
        rows = self._reader.execute(
            "SELECT id, '', metadata, content_hash, chunks, created_at, updated_at "
            "FROM documents WHERE collection_id = ? AND id > ? AND id >= ? "
            "AND substr(id, 1, ?) = ? ORDER BY id LIMIT ?",
            (collection_id, after or "", prefix, len(prefix), prefix, limit + 1),
        ).fetchall()
        docs = [DocumentRow(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows[:limit]]
        return docs, len(rows) > limit

    def stage_upsert(
        self,
        collection: CollectionRow | None,
        create: CollectionOptions | None,
        docs: Sequence[DocumentWrite],
    ) -> tuple[StagedWrite, CollectionRow]:
        """Run an upsert inside an open transaction; the caller commits or rolls back.

        ``create`` (collection options) makes the collection in the same transaction when it
        does not exist yet. Statuses are decided against the state inside the transaction.
        """
        self._write_lock.acquire()
        w = self._writer
        staged = StagedWrite(w, self._write_lock)
        try:
            w.execute("BEGIN IMMEDIATE")
            if collection is None:
                assert create is not None
                made = self.create_collection(create, conn=w)
                collection = made or self._collection_in(w, create.name)
            now = time.time()
            doc_delta = chunk_delta = 0
            for doc in docs:
                meta_json = canonical_json(doc.metadata)
                old = w.execute(
                    "SELECT pk, content_hash, metadata, chunks FROM documents "
                    "WHERE collection_id = ? AND id = ?",
                    (collection.id, doc.id),
                ).fetchone()
                new_questions = doc.questions is not None and doc.questions != (
                    self._questions_in(w, old[0]) if old is not None else []
                )
                if (
                    old is not None
                    and old[1] == doc.content_hash
                    and old[2] == meta_json
                    and not new_questions
                ):
                    staged.statuses[doc.id] = "unchanged"
                    staged.chunk_counts[doc.id] = old[3]
                    continue
                if new_questions and doc.question_vectors is None:
                    raise StaleWrite(f"questions of document {doc.id!r} changed concurrently")
                if old is not None and doc.chunks is None and old[1] != doc.content_hash:
                    raise StaleWrite(f"document {doc.id!r} changed concurrently; retry")
                if old is not None and (doc.chunks is None or old[1] == doc.content_hash):
                    # Same text: only metadata (or questions) change; chunks and vectors stay.
                    w.execute(
                        "UPDATE documents SET metadata = ?, updated_at = ? WHERE pk = ?",
                        (meta_json, now, old[0]),
                    )
                    if new_questions:
                        self._replace_questions(w, staged, collection.id, old[0], doc)
                    staged.statuses[doc.id] = "updated"
                    staged.chunk_counts[doc.id] = old[3]
                    continue
                assert doc.chunks is not None and doc.vectors is not None
                if old is not None:
                    removed = [
                        r[0] for r in w.execute("SELECT id FROM chunks WHERE doc_pk = ?", (old[0],))
                    ]
                    w.execute("DELETE FROM chunks WHERE doc_pk = ?", (old[0],))
                    staged.removed.extend(removed)
                    chunk_delta -= len(removed)
                    w.execute(
                        "UPDATE documents SET text = ?, metadata = ?, content_hash = ?, "
                        "chunks = ?, updated_at = ? WHERE pk = ?",
                        (doc.text, meta_json, doc.content_hash, len(doc.chunks), now, old[0]),
                    )
                    pk = old[0]
                    staged.statuses[doc.id] = "updated"
                else:
                    cur = w.execute(
                        "INSERT INTO documents (collection_id, id, text, metadata, content_hash, "
                        "chunks, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            collection.id,
                            doc.id,
                            doc.text,
                            meta_json,
                            doc.content_hash,
                            len(doc.chunks),
                            now,
                            now,
                        ),
                    )
                    pk = cur.lastrowid
                    doc_delta += 1
                    staged.statuses[doc.id] = "created"
                vectors = np.ascontiguousarray(doc.vectors, dtype=np.float32)
                for chunk, vec in zip(doc.chunks, vectors, strict=True):
                    cur = w.execute(
                        'INSERT INTO chunks (collection_id, doc_pk, position, start, "end", '
                        "text, embedding) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            collection.id,
                            pk,
                            chunk.position,
                            chunk.start,
                            chunk.end,
                            chunk.text,
                            vec.tobytes(),
                        ),
                    )
                    staged.added_ids.append(int(cur.lastrowid or 0))
                staged.added_vectors.append(vectors)
                staged.chunk_counts[doc.id] = len(doc.chunks)
                chunk_delta += len(doc.chunks)
                if new_questions:
                    self._replace_questions(w, staged, collection.id, pk, doc)
            w.execute(
                "UPDATE collections SET documents = documents + ?, chunks = chunks + ?, "
                "questions = questions + ? WHERE id = ?",
                (doc_delta, chunk_delta, staged.question_delta, collection.id),
            )
            return staged, collection
        except BaseException:
            staged.rollback()
            raise

    # ---- known questions (see indexes.questions) ------------------------------------------
    @staticmethod
    def _questions_in(conn: sqlite3.Connection, doc_pk: int) -> list[str]:
        rows = conn.execute(
            "SELECT text FROM questions WHERE doc_pk = ? ORDER BY id", (doc_pk,)
        ).fetchall()
        return [r[0] for r in rows]

    @staticmethod
    def _insert_questions(
        conn: sqlite3.Connection,
        staged: StagedWrite,
        collection_id: int,
        doc_pk: int,
        texts: Sequence[str],
        vectors: np.ndarray,
    ) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} questions need as many vectors, got {len(vectors)}")
        for text, vec in zip(texts, vectors, strict=True):
            cur = conn.execute(
                "INSERT INTO questions (collection_id, doc_pk, text, embedding) "
                "VALUES (?, ?, ?, ?)",
                (collection_id, doc_pk, text, vec.tobytes()),
            )
            staged.added_ids.append(int(cur.lastrowid or 0) + QUESTION_ID_OFFSET)
        if len(texts):
            staged.added_vectors.append(vectors)
        staged.question_delta += len(texts)

    def _replace_questions(
        self,
        conn: sqlite3.Connection,
        staged: StagedWrite,
        collection_id: int,
        doc_pk: int,
        doc: DocumentWrite,
    ) -> None:
        """Swap a document's stored questions (and their index ids) for ``doc.questions``."""
        assert doc.questions is not None and doc.question_vectors is not None
        self._remove_questions(conn, staged, doc_pk)
        self._insert_questions(
            conn, staged, collection_id, doc_pk, doc.questions, doc.question_vectors
        )

    @staticmethod
    def _remove_questions(conn: sqlite3.Connection, staged: StagedWrite, doc_pk: int) -> None:
        ids = [r[0] for r in conn.execute("SELECT id FROM questions WHERE doc_pk = ?", (doc_pk,))]
        if ids:
            conn.execute("DELETE FROM questions WHERE doc_pk = ?", (doc_pk,))
            staged.removed.extend(i + QUESTION_ID_OFFSET for i in ids)
            staged.question_delta -= len(ids)

    def questions_of(self, collection_id: int, doc_ids: Sequence[str]) -> dict[str, list[str]]:
        """Stored questions of those of ``doc_ids`` that have any, in stored order."""
        out: dict[str, list[str]] = {}
        for part in _batches(list(doc_ids)):
            rows = self._reader.execute(
                "SELECT d.id, q.text FROM questions q JOIN documents d ON d.pk = q.doc_pk "
                f"WHERE d.collection_id = ? AND d.id IN ({','.join('?' * len(part))}) "
                "ORDER BY q.id",
                (collection_id, *part),
            ).fetchall()
            for doc_id, text in rows:
                out.setdefault(doc_id, []).append(text)
        return out

    def stage_add_questions(
        self, collection_id: int, writes: Sequence[QuestionWrite], limit: int
    ) -> tuple[StagedWrite, QuestionsOutcome]:
        """Append questions in an open transaction (questions a document holds already, the
        same after :func:`~indexes.questions.normalise`, are skipped). When the outcome names
        missing or over-limit documents the transaction is rolled back before returning
        (nothing held)."""
        self._write_lock.acquire()
        w = self._writer
        staged = StagedWrite(w, self._write_lock)
        outcome = QuestionsOutcome()
        try:
            w.execute("BEGIN IMMEDIATE")
            plans: list[tuple[int, list[int], QuestionWrite]] = []
            for write in writes:
                found = w.execute(
                    "SELECT pk FROM documents WHERE collection_id = ? AND id = ?",
                    (collection_id, write.document_id),
                ).fetchone()
                if found is None:
                    outcome.missing.append(write.document_id)
                    continue
                stored = self._questions_in(w, found[0])
                keep = new_questions(stored, write.questions)
                total = len(stored) + len(keep)
                if total > limit:
                    outcome.over_limit.append(write.document_id)
                outcome.added[write.document_id] = len(keep)
                outcome.totals[write.document_id] = total
                plans.append((found[0], keep, write))
            if not outcome.written:
                staged.rollback()
                return staged, outcome
            now = time.time()
            for doc_pk, keep, write in plans:
                if not keep:
                    continue
                texts = [write.questions[i] for i in keep]
                self._insert_questions(
                    w, staged, collection_id, doc_pk, texts, np.asarray(write.vectors)[keep]
                )
                w.execute("UPDATE documents SET updated_at = ? WHERE pk = ?", (now, doc_pk))
            w.execute(
                "UPDATE collections SET questions = questions + ? WHERE id = ?",
                (staged.question_delta, collection_id),
            )
            return staged, outcome
        except BaseException:
            staged.rollback()
            raise

    def question_vector_ids(self, collection_id: int) -> np.ndarray:
        """The index ids (row id + QUESTION_ID_OFFSET) of the collection's questions."""
        rows = self._reader.execute(
            "SELECT id FROM questions WHERE collection_id = ? ORDER BY id", (collection_id,)
        ).fetchall()
        return np.fromiter((r[0] + QUESTION_ID_OFFSET for r in rows), np.int64, len(rows))

    def question_embeddings(
        self, index_ids: Sequence[int], dimension: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(index ids, vectors) in batches for question index ids."""
        for part in _batches([int(i) - QUESTION_ID_OFFSET for i in index_ids]):
            rows = self._reader.execute(
                f"SELECT id, embedding FROM questions WHERE id IN ({','.join('?' * len(part))})",
                part,
            ).fetchall()
            if rows:
                got = np.fromiter(
                    (r[0] + QUESTION_ID_OFFSET for r in rows), dtype=np.int64, count=len(rows)
                )
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
                yield got, vecs.reshape(len(rows), dimension)

    def filtered_question_ids(self, collection_id: int, flt: MetadataFilter) -> np.ndarray:
        """Index ids of the questions of the documents the filter lets through."""
        sql, params = filter_sql(flt)
        rows = self._reader.execute(
            "SELECT q.id FROM questions q JOIN documents d ON d.pk = q.doc_pk "
            f"WHERE q.collection_id = ? AND {sql}",
            (collection_id, *params),
        ).fetchall()
        return np.fromiter((r[0] + QUESTION_ID_OFFSET for r in rows), np.int64, len(rows))

    def question_documents(self, index_ids: Sequence[int]) -> dict[int, int]:
        """``{index id: document pk}`` for question index ids."""
        out: dict[int, int] = {}
        for part in _batches([int(i) - QUESTION_ID_OFFSET for i in index_ids]):
            rows = self._reader.execute(
                f"SELECT id, doc_pk FROM questions WHERE id IN ({','.join('?' * len(part))})",
                part,
            ).fetchall()
            out.update({int(r[0]) + QUESTION_ID_OFFSET: int(r[1]) for r in rows})
        return out

    def best_chunks(
        self, doc_pks: Sequence[int], vector: np.ndarray, dimension: int
    ) -> dict[int, tuple[int, float]]:
        """``{document pk: (chunk id, score)}``: each document's chunk nearest to ``vector``
        (inner product with the chunks' stored embeddings)."""
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        out: dict[int, tuple[int, float]] = {}
        for part in _batches(list(doc_pks)):
            rows = self._reader.execute(
                "SELECT doc_pk, id, embedding FROM chunks "
                f"WHERE doc_pk IN ({','.join('?' * len(part))})",
                part,
            ).fetchall()
            if not rows:
                continue
            vecs = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32)
            scores = vecs.reshape(len(rows), dimension) @ query
            for (doc_pk, cid, _), score in zip(rows, scores.tolist(), strict=True):
                if doc_pk not in out or score > out[doc_pk][1]:
                    out[doc_pk] = (int(cid), float(score))
        return out

    def _collection_in(self, conn: sqlite3.Connection, name: str) -> CollectionRow:
        row = conn.execute(
            f"SELECT {self._COLLECTION_COLS} FROM collections WHERE name = ?", (name,)
        ).fetchone()
        return _collection_row(row)

    def stage_delete(self, collection_id: int, doc_id: str) -> StagedWrite | None:
        """Delete a document in an open transaction; None (nothing held) if it is absent."""
        self._write_lock.acquire()
        w = self._writer
        staged = StagedWrite(w, self._write_lock)
        try:
            w.execute("BEGIN IMMEDIATE")
            row = w.execute(
                "SELECT pk FROM documents WHERE collection_id = ? AND id = ?",
                (collection_id, doc_id),
            ).fetchone()
            if row is None:
                staged.rollback()
                return None
            staged.removed = [
                r[0] for r in w.execute("SELECT id FROM chunks WHERE doc_pk = ?", (row[0],))
            ]
            chunks = len(staged.removed)
            w.execute("DELETE FROM chunks WHERE doc_pk = ?", (row[0],))
            self._remove_questions(w, staged, row[0])
            w.execute("DELETE FROM documents WHERE pk = ?", (row[0],))
            w.execute(
                "UPDATE collections SET documents = documents - 1, chunks = chunks - ?, "
                "questions = questions + ? WHERE id = ?",
                (chunks, staged.question_delta, collection_id),
            )
            return staged
        except BaseException:
            staged.rollback()
            raise

    # ---- chunks, for search and index recovery -------------------------------------------
    def chunk_ids(self, collection_id: int) -> np.ndarray:
        rows = self._reader.execute(
            "SELECT id FROM chunks WHERE collection_id = ? ORDER BY id", (collection_id,)
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def embeddings(
        self, ids: Sequence[int], dimension: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) in batches for the given chunk ids."""
        for part in _batches(list(ids)):
            rows = self._reader.execute(
                f"SELECT id, embedding FROM chunks WHERE id IN ({','.join('?' * len(part))})",
                part,
            ).fetchall()
            if rows:
                got = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
                yield got, vecs.reshape(len(rows), dimension)

    def filtered_chunk_ids(self, collection_id: int, flt: MetadataFilter) -> np.ndarray:
        sql, params = filter_sql(flt)
        rows = self._reader.execute(
            "SELECT c.id FROM chunks c JOIN documents d ON d.pk = c.doc_pk "
            f"WHERE c.collection_id = ? AND {sql}",
            (collection_id, *params),
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def bm25(
        self, collection_id: int, query: str, limit: int, flt: MetadataFilter | None = None
    ) -> list[tuple[int, float]]:
        """Chunk ids ranked by BM25 (FTS5) for the content words of ``query`` (stop words
        left out, as PostgreSQL's ``english`` configuration does); best first."""
        words = content_words(_WORD.findall(query.lower())[:64])
        if not words:
            return []
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        where, params = "", ()
        if flt is not None:
            sql, params = filter_sql(flt)
            where = f" AND {sql}"
        rows = self._reader.execute(
            "SELECT c.id, -bm25(chunks_fts) AS score FROM chunks_fts "
            "JOIN chunks c ON c.id = chunks_fts.rowid JOIN documents d ON d.pk = c.doc_pk "
            f"WHERE chunks_fts MATCH ? AND c.collection_id = ?{where} "
            "ORDER BY bm25(chunks_fts) LIMIT ?",
            (match, collection_id, *params, limit),
        ).fetchall()
        return [(int(r[0]), float(r[1])) for r in rows]

    def hydrate(self, ids: Sequence[int]) -> dict[int, Hit]:
        out: dict[int, Hit] = {}
        for part in _batches(list(ids)):
            rows = self._reader.execute(
                'SELECT c.id, d.id, c.text, d.metadata, c.position, c.start, c."end" '
                "FROM chunks c JOIN documents d ON d.pk = c.doc_pk "
                f"WHERE c.id IN ({','.join('?' * len(part))})",
                part,
            ).fetchall()
            for r in rows:
                out[r[0]] = Hit(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6])
        return out


def _collection_row(r: Sequence[Any]) -> CollectionRow:
    cid, name, model, dimension, factory, tokens, overlap, docs, chunks, created, search = r[:11]
    return CollectionRow(
        cid,
        name,
        model,
        dimension,
        factory,
        tokens,
        overlap,
        docs,
        chunks,
        created,
        json.loads(search),
        questions=int(r[11]),
    )


def _batches(items: list[Any], size: int = _SQL_VARS) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
