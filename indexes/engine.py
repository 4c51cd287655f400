"""The storage seam: the protocols every storage engine implements, and its errors.

Two engines implement it:

* ``embedded`` (:mod:`indexes.embedded`): SQLite in WAL mode (+ FTS5) as the source of truth
  and one FAISS index per collection in memory, derived from it. One process.
* ``postgres`` (:mod:`indexes.postgres`): PostgreSQL with pgvector and tsvector; the database
  holds everything, so any number of service replicas serve the same collections.

An :class:`Engine` owns the collections; a :class:`Collection` is one live collection that owns
its consistency: upsert (one transaction, old chunks out and new in), delete, get, list and
search. The service validates, chunks and embeds; the collection stores and finds.

Errors are this module's own (the storage layer knows nothing of HTTP); the service maps them
to its error tree in one place (``rag_service.errors``).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from indexes.questions import QuestionsOutcome, QuestionWrite
from indexes.types import (
    CollectionOptions,
    CollectionRow,
    DocumentRow,
    DocumentWrite,
    ScoredHit,
    SearchQuery,
    WriteOutcome,
)

__all__ = [
    "AdapterStore",
    "Collection",
    "CollectionGone",
    "CollectionTaken",
    "DocumentTexts",
    "Engine",
    "IndexUnusable",
    "InvalidIndex",
    "KeyRowStore",
    "StaleWrite",
    "StorageError",
    "StoreBusy",
    "StoreUnavailable",
]


class StorageError(Exception):
    """Base of the storage layer's errors."""


class CollectionGone(StorageError):
    """The collection does not exist (any more)."""


class CollectionTaken(StorageError):
    """A collection of that name exists already."""


class InvalidIndex(StorageError, ValueError):
    """The engine cannot build the index a collection asks for."""


class IndexUnusable(StorageError):
    """The collection was embedded by another model, or its index cannot be used."""


class StaleWrite(StorageError):
    """A document's text changed between the read of its hash and the write that relied on
    it (another upsert of the same id won the race): read, chunk and embed it again."""


class StoreBusy(StorageError):
    """The store is locked by another writer past the wait limit: retry shortly."""


class StoreUnavailable(StorageError):
    """The store cannot be reached (a database that is down): retry later."""


@runtime_checkable
class Collection(Protocol):
    """One live collection. Every method is safe to call from the event loop; blocking work
    runs off it."""

    @property
    def row(self) -> CollectionRow:
        """Options and counters (as of the last change this process saw)."""
        ...

    async def existing(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``{id: (content_hash, canonical metadata json)}`` for those of ``ids`` stored."""
        ...

    async def upsert(
        self, writes: Sequence[DocumentWrite], *, model: str | None = None
    ) -> WriteOutcome:
        """Apply all writes in one transaction, or none; durable and searchable on return.
        ``model``: the embedding model that made the vectors; when the collection no longer
        records it (a reindex swapped meanwhile) nothing is written and
        :class:`~indexes.reindex.ModelChanged` (a :class:`StaleWrite`) is raised."""
        ...

    async def delete(self, doc_id: str) -> bool:
        """Remove a document and its chunks; False when it was not there."""
        ...

    async def get(self, doc_id: str) -> DocumentRow | None: ...

    async def questions(self, ids: Sequence[str]) -> dict[str, builtins.list[str]]:
        """The stored known questions of those of ``ids`` that have any, in stored order."""
        ...

    async def add_questions(
        self, writes: Sequence[QuestionWrite], *, limit: int, model: str | None = None
    ) -> QuestionsOutcome:
        """Append questions to documents in one transaction (questions a document holds
        already, the same after :func:`~indexes.questions.normalise`, are skipped); nothing is
        written when a document is missing or would hold more than ``limit`` questions (the
        outcome names them). ``model`` as for :meth:`upsert`."""
        ...

    async def list(
        self, *, limit: int, after: str | None, prefix: str = ""
    ) -> tuple[builtins.list[DocumentRow], bool]:
        """Documents ordered by id after ``after`` (whose ids start with ``prefix``), without
        text; and whether more follow."""
        ...

    async def search(
        self, query: SearchQuery, timings: dict[str, float] | None = None
    ) -> builtins.list[ScoredHit]:
        """Top-k chunks for the query (dense, or hybrid with BM25), filter applied first."""
        ...


@runtime_checkable
class DocumentTexts(Protocol):
    """A :class:`Collection` that also reads many documents' texts in one go (postgres does;
    callers fall back to :meth:`Collection.get` per document elsewhere)."""

    async def texts(self, ids: Sequence[str]) -> dict[str, str]:
        """``{id: text}`` for those of ``ids`` stored."""
        ...


@runtime_checkable
class Engine(Protocol):
    name: str

    async def open(self) -> None:
        """Connect, migrate, restore: ready to serve when it returns."""
        ...

    async def close(self) -> None: ...

    def check_index(self, index: str, dimension: int) -> None:
        """Raise ValueError, saying what is allowed, unless this engine can build ``index``."""
        ...

    def find(self, name: str) -> Collection | None:
        """The live collection called ``name``, or None."""
        ...

    async def lookup(self, name: str) -> Collection | None:
        """Like :meth:`find`, but also sees a collection another replica made a moment ago
        (an engine shared by several processes reads through to its store on a miss)."""
        ...

    def get(self, name: str) -> Collection:
        """Like :meth:`find`; raises :class:`CollectionGone`."""
        ...

    async def create(self, options: CollectionOptions) -> Collection:
        """Create and return a collection; :class:`CollectionTaken` if the name is in use."""
        ...

    async def upsert_new(
        self, options: CollectionOptions, writes: Sequence[DocumentWrite]
    ) -> tuple[Collection, WriteOutcome]:
        """Write into ``options.name``, creating it in the same transaction if it does not
        exist (a failed write leaves no empty collection behind)."""
        ...

    async def drop(self, name: str) -> None: ...

    async def configure(self, name: str, search: dict[str, Any]) -> CollectionRow:
        """Replace a collection's search defaults (validated by the service); its row after.
        :class:`CollectionGone` when it does not exist."""
        ...

    async def list(self) -> builtins.list[CollectionRow]:
        """Every collection with up-to-date counters, by name."""
        ...

    def describe(self) -> dict[str, Any]:
        """What /ready reports about the store (restore reports, connection state)."""
        ...


@runtime_checkable
class AdapterStore(Protocol):
    """An engine that also keeps which adapters every replica serves (postgres does)."""

    async def adapters_list(self) -> builtins.list[Any]:
        """Records with ``name``, ``path`` (relative to the adapters directory), ``version``."""
        ...

    async def adapters_put(
        self,
        name: str,
        path: str,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Any: ...

    async def adapters_delete(self, name: str) -> bool: ...


@runtime_checkable
class KeyRowStore(Protocol):
    """An engine that also keeps the service's API keys (rows of id, name, SHA-256 digest,
    hint, scopes JSON, created_at), shared by every replica (postgres does)."""

    async def api_keys_load(self) -> builtins.list[tuple[str, str, bytes, str, str, float]]: ...

    async def api_keys_insert(self, row: tuple[str, str, bytes, str, str, float]) -> None: ...

    async def api_keys_delete(self, key_id: str) -> bool: ...
