"""The postgres engine's schema: versioned migrations and the per-collection chunk partitions.

Tables (all prefixed ``rag_`` so they can share a database with other applications):

``rag_schema_version``
    one row per applied migration; the highest version is the schema's version.
``rag_collections``
    options (name, embedding model, dimension, index string, chunking) and the counters
    ``documents`` / ``chunks``, kept in step by every write transaction.
``rag_documents``
    (collection_id, id) unique; text, metadata JSONB (GIN, ``jsonb_path_ops``, for filters),
    content hash, chunk count, timestamps.
``rag_chunks``
    partitioned by ``collection_id``, one partition ``rag_chunks_<collection id>`` per
    collection: position, character span, text, ``embedding vector`` and a ``tsv tsvector``
    generated from the text (english configuration, GIN). A partition carries a CHECK on its
    collection's dimension and, for an HNSW collection, its own HNSW index on
    ``embedding::vector(<dimension>)`` with inner-product operators. So collections of
    different dimensions share one table, an index is built on an empty table at creation, a
    search touches one collection's rows, and a dropped collection's chunks go as one table.
``rag_questions``
    known questions of documents (text, ``embedding vector`` of the collection's dimension,
    checked on write), deleted with their document or collection; searched exactly, per
    collection, beside the chunks (see :mod:`indexes.questions`). ``rag_collections.questions``
    counts them.
``rag_reindex_jobs``, ``rag_reindex_vectors``
    reindex jobs (a collection moving to another embedding model) and the new model's
    vectors until the swap (:mod:`indexes.postgres.reindex`); both go with their collection.
``rag_adapters``
    the adapter registry every replica shares.
``rag_api_keys``
    the service's scoped API keys (SHA-256 digests of their secrets), shared the same way.

Migrations run at start, each in its own transaction under a transaction-level advisory lock,
so replicas that start together apply each one exactly once. A database whose version is
newer than this code refuses to serve (:class:`~indexes.postgres.errors.SchemaTooNew`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from psycopg import AsyncConnection
from psycopg import errors as pg_errors

from indexes.engine import StorageError
from indexes.postgres.errors import SchemaTooNew
from indexes.postgres.sql import IndexSpec

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Migration",
    "create_hnsw_index",
    "create_partition",
    "drop_partition",
    "migrate",
    "orphan_partitions",
    "partition_name",
]

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key that serialises migrations (any fixed 64-bit number).
MIGRATION_LOCK = 0x7261675F736368  # "rag_sch"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "collections, documents, chunks partitioned by collection, adapters",
        """
CREATE TABLE rag_collections (
    id bigserial PRIMARY KEY,
    name text COLLATE "C" NOT NULL UNIQUE,
    embedding_model text NOT NULL,
    dimension integer NOT NULL CHECK (dimension > 0),
    index_factory text NOT NULL,
    chunk_tokens integer NOT NULL,
    chunk_overlap integer NOT NULL,
    documents bigint NOT NULL DEFAULT 0,
    chunks bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE rag_documents (
    pk bigserial PRIMARY KEY,
    collection_id bigint NOT NULL REFERENCES rag_collections (id) ON DELETE CASCADE,
    id text COLLATE "C" NOT NULL,
    text text NOT NULL,
    metadata jsonb NOT NULL,
    content_hash text NOT NULL,
    chunks integer NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    UNIQUE (collection_id, id)
);
CREATE INDEX rag_documents_metadata ON rag_documents USING gin (metadata jsonb_path_ops);
CREATE TABLE rag_chunks (
    collection_id bigint NOT NULL,
    id bigserial,
    doc_pk bigint NOT NULL,
    position integer NOT NULL,
    start integer NOT NULL,
    "end" integer NOT NULL,
    text text NOT NULL,
    embedding vector NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('english'::regconfig, text)) STORED,
    PRIMARY KEY (collection_id, id)
) PARTITION BY LIST (collection_id);
CREATE INDEX rag_chunks_doc ON rag_chunks (doc_pk);
CREATE INDEX rag_chunks_tsv ON rag_chunks USING gin (tsv);
CREATE TABLE rag_adapters (
    name text COLLATE "C" PRIMARY KEY,
    path text NOT NULL,
    version integer NOT NULL DEFAULT 1,
    rank integer,
    alpha double precision,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    metadata jsonb NOT NULL DEFAULT '{}'
);
""",
    ),
    Migration(
        2,
        "API keys shared by every replica",
        """
CREATE TABLE rag_api_keys (
    id text PRIMARY KEY,
    name text NOT NULL,
    digest bytea NOT NULL UNIQUE,
    hint text NOT NULL,
    scopes jsonb NOT NULL,
    created_at double precision NOT NULL
);
""",
    ),
    Migration(
        3,
        "per-collection search defaults",
        """
ALTER TABLE rag_collections ADD COLUMN search_defaults jsonb NOT NULL DEFAULT '{}';
""",
    ),
    Migration(
        4,
        "known questions as extra keys of documents",
        """
CREATE TABLE rag_questions (
    id bigserial PRIMARY KEY,
    collection_id bigint NOT NULL REFERENCES rag_collections (id) ON DELETE CASCADE,
    doc_pk bigint NOT NULL REFERENCES rag_documents (pk) ON DELETE CASCADE,
    text text NOT NULL,
    embedding vector NOT NULL
);
CREATE INDEX rag_questions_doc ON rag_questions (doc_pk);
CREATE INDEX rag_questions_collection ON rag_questions (collection_id);
ALTER TABLE rag_collections ADD COLUMN questions bigint NOT NULL DEFAULT 0;
""",
    ),
    Migration(
        5,
        "reindex jobs and their shadow vectors (see indexes.postgres.reindex)",
        """
CREATE TABLE rag_reindex_jobs (
    id bigserial PRIMARY KEY,
    collection_id bigint NOT NULL REFERENCES rag_collections (id) ON DELETE CASCADE,
    embedding_model text NOT NULL,
    dimension integer NOT NULL CHECK (dimension > 0),
    source_model text NOT NULL,
    state text NOT NULL,
    done bigint NOT NULL DEFAULT 0,
    total bigint NOT NULL DEFAULT 0,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rag_reindex_jobs_collection ON rag_reindex_jobs (collection_id, id);
CREATE TABLE rag_reindex_vectors (
    collection_id bigint NOT NULL REFERENCES rag_collections (id) ON DELETE CASCADE,
    key bigint NOT NULL,
    embedding vector NOT NULL,
    PRIMARY KEY (collection_id, key)
);
""",
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS rag_schema_version (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def _current(conn: AsyncConnection) -> int:
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM rag_schema_version")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


def _too_new(found: int, where: str) -> SchemaTooNew:
    return SchemaTooNew(
        f"the database {where} has schema version {found}, newer than the {SCHEMA_VERSION} "
        "this version of rag-service understands: upgrade rag-service, or point "
        "RAG_DATABASE_URL at another database"
    )


async def _ensure_pgvector(conn: AsyncConnection, where: str) -> str:
    """The pgvector version in this database, creating the extension when it is missing."""
    cur = await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    found = await cur.fetchone()
    if found is not None:
        return str(found[0])
    try:
        await conn.execute("CREATE EXTENSION vector")
    except (pg_errors.InsufficientPrivilege, pg_errors.UndefinedFile) as exc:
        raise StorageError(
            f"the database {where} has no pgvector extension and cannot get it here "
            f"({exc.diag.message_primary or exc}): install pgvector (0.5 or newer) "
            "on the server and run CREATE EXTENSION vector in this database as a superuser"
        ) from exc
    cur = await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    created = await cur.fetchone()
    return str(created[0]) if created else "unknown"


async def migrate(conn: AsyncConnection, where: str) -> tuple[int, str]:
    """Bring the schema up to :data:`SCHEMA_VERSION` on an autocommit connection; returns the
    version and pgvector's. Each missing migration runs in its own transaction under the
    migration lock and re-reads the version there, so concurrent starters apply it once."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(_VERSION_TABLE)
        current = await _current(conn)
        if current > SCHEMA_VERSION:
            raise _too_new(current, where)
        pgvector = await _ensure_pgvector(conn, where)
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            current = await _current(conn)
            if current > SCHEMA_VERSION:
                raise _too_new(current, where)
            if current >= migration.version:
                continue
            log.info("applying schema migration %d: %s", migration.version, migration.description)
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO rag_schema_version (version, description) VALUES (%s, %s)",
                (migration.version, migration.description),
            )
            current = migration.version
    return current, pgvector


def partition_name(collection_id: int) -> str:
    return f"rag_chunks_{int(collection_id)}"


async def create_partition(
    conn: AsyncConnection, collection_id: int, dimension: int, spec: IndexSpec
) -> None:
    """Create and attach a collection's chunk partition (inside the caller's transaction).

    The table is made standalone and then attached, which takes only a SHARE UPDATE EXCLUSIVE
    lock on ``rag_chunks`` (``CREATE TABLE ... PARTITION OF`` would block every reader of
    every collection until the transaction ends). It is empty, so attaching, the partitioned
    indexes and the HNSW index cost nothing.
    """
    table = partition_name(collection_id)
    cid, dim = int(collection_id), int(dimension)
    await conn.execute(
        f"CREATE TABLE {table} (LIKE rag_chunks INCLUDING DEFAULTS INCLUDING GENERATED)"
    )
    await conn.execute(
        f"ALTER TABLE {table} ADD CONSTRAINT {table}_dims CHECK (vector_dims(embedding) = {dim})"
    )
    await conn.execute(f"ALTER TABLE rag_chunks ATTACH PARTITION {table} FOR VALUES IN ({cid})")
    if spec.hnsw:
        await create_hnsw_index(conn, table, dim, spec)


async def create_hnsw_index(
    conn: AsyncConnection,
    table: str,
    dimension: int,
    spec: IndexSpec,
    *,
    concurrently: bool = False,
) -> None:
    """A chunk partition's HNSW index, on ``embedding::vector(<dimension>)`` with
    inner-product operators: at creation, and ``concurrently`` (on an autocommit connection,
    searches and writes going on) after a reindex changed the dimension."""
    how = "CONCURRENTLY IF NOT EXISTS " if concurrently else ""
    await conn.execute(
        f"CREATE INDEX {how}{table}_hnsw ON {table} USING hnsw "
        f"((embedding::vector({int(dimension)})) vector_ip_ops) "
        f"WITH (m = {int(spec.m)}, ef_construction = {int(spec.ef_construction)})"
    )


async def orphan_partitions(conn: AsyncConnection) -> list[tuple[str, bool, bool]]:
    """``(table, attached, detach_pending)`` for every chunk partition whose collection is
    gone (left by a drop whose clean-up did not finish)."""
    cur = await conn.execute(
        """
        SELECT c.relname, i.inhrelid IS NOT NULL, coalesce(i.inhdetachpending, false)
        FROM pg_class c
        LEFT JOIN pg_inherits i
          ON i.inhrelid = c.oid AND i.inhparent = 'rag_chunks'::regclass
        WHERE c.relkind = 'r'
          AND c.relnamespace = (SELECT relnamespace FROM pg_class
                                WHERE oid = 'rag_chunks'::regclass)
          AND c.relname ~ '^rag_chunks_[0-9]+$'
          AND NOT EXISTS (SELECT 1 FROM rag_collections
                          WHERE id = substr(c.relname, 12)::bigint)
        """
    )
    return [(str(r[0]), bool(r[1]), bool(r[2])) for r in await cur.fetchall()]


async def drop_partition(conn: AsyncConnection, table: str, attached: bool, pending: bool) -> None:
    """Detach (without blocking other collections) and drop a dropped collection's partition,
    on an autocommit connection."""
    if attached:
        how = "FINALIZE" if pending else "CONCURRENTLY"
        await conn.execute(f"ALTER TABLE rag_chunks DETACH PARTITION {table} {how}")
    await conn.execute(f"DROP TABLE IF EXISTS {table}")
