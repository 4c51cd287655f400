"""Moving a collection to another embedding model: the storage side of a reindex.

A reindex re-embeds a collection's stored texts (its chunks and its known questions) with a
new model while the old vectors keep serving, then swaps. The service embeds; the engine
keeps the job and the new vectors and makes the swap atomic. Both engines implement the
same three steps:

1. **Shadow vectors.** Every vector of the new model goes to a shadow table (SQLite
   ``reindex_vectors``, PostgreSQL ``rag_reindex_vectors``) under its *key*: a chunk's id, or
   a question's id plus :data:`~indexes.questions.QUESTION_ID_OFFSET` (as in the embedded
   engine's FAISS index). Nothing the searches read changes. Each batch commits its vectors
   and the job's progress in one transaction, so a crash loses at most the batch in flight
   and the job resumes where it stopped.
2. **Writes meanwhile** go on as usual, with the old model, into the live index. A chunk or
   question they add has no shadow vector yet: :meth:`ReindexClaim.pending` finds it, and the
   swap catches up on whatever is still missing while it holds the collection's writers off.
   Rows they remove leave shadow vectors behind that the swap ignores and drops.
3. **The swap**, one transaction: the vectors of every chunk and question are replaced by
   their shadow vectors, the collection's embedding model and dimension change, the shadow
   rows go and the job is marked done. A search runs either wholly before it (old model,
   old vectors) or wholly after it (new model, new vectors): the embedded engine builds the
   new FAISS index before committing and replaces index and row under the collection's write
   lock; PostgreSQL does it in the transaction. A search or a write whose vectors were made
   by the model the collection no longer records fails with :class:`ModelChanged`, and the
   service embeds again with the new one.

A job is *claimed* by the one runner that works on it: :class:`ReindexRunning` answers
anyone else. The embedded engine's claims live in its one process; PostgreSQL's are session
advisory locks on a connection of the runner, released by the server when that process
dies, so any replica may take over a job whose runner is gone (:meth:`Reindexer.stalled`).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from indexes.engine import StaleWrite, StorageError
from indexes.types import CollectionRow

__all__ = [
    "JOB_STATES",
    "Embed",
    "JobState",
    "ModelChanged",
    "ReindexCapable",
    "ReindexClaim",
    "ReindexJob",
    "ReindexRunning",
    "Reindexer",
]

JobState = Literal["running", "done", "failed"]
JOB_STATES: tuple[JobState, ...] = ("running", "done", "failed")

# Texts -> their vectors under the new model, shape (len(texts), dimension).
Embed = Callable[[list[str]], Awaitable[np.ndarray]]


class ModelChanged(StaleWrite):
    """The collection's embedding model changed (a reindex swapped) after the caller made its
    vectors with the old one: embed again with the collection's current model."""


class ReindexRunning(StorageError):
    """The collection's reindex is claimed by a live runner (here or in another replica)."""


@dataclass(frozen=True, slots=True)
class ReindexJob:
    """One reindex of a collection, as stored."""

    id: int
    collection: str
    collection_id: int
    embedding_model: str  # the target model's identifier
    dimension: int
    source_model: str  # what the collection recorded when the job began
    state: JobState
    done: int  # vectors of the new model committed
    total: int  # chunks and questions of the collection (grows with writes meanwhile)
    error: str | None
    created_at: float
    updated_at: float


@runtime_checkable
class ReindexClaim(Protocol):
    """A claimed job: the one live handle that may add vectors to it and swap it."""

    @property
    def job(self) -> ReindexJob:
        """The job as of the claim's last change."""
        ...

    async def pending(self, after: int, limit: int) -> builtins.list[tuple[int, str]]:
        """Up to ``limit`` ``(key, text)`` without a shadow vector, keys above ``after``,
        in key order (chunks first, then questions)."""
        ...

    async def store(self, keys: Sequence[int], vectors: np.ndarray) -> ReindexJob:
        """Commit shadow vectors and the job's progress in one transaction."""
        ...

    async def swap(self, embed: Embed) -> CollectionRow:
        """Catch up on what is still missing (``embed`` makes those vectors), then switch
        model, dimension and every vector in one transaction; the collection's new row.
        :class:`~indexes.engine.CollectionGone` when the collection was dropped."""
        ...

    async def fail(self, error: str) -> None:
        """Record that the job stopped on an error (the old index keeps serving; a new
        request for the same model resumes from the vectors already stored)."""
        ...

    async def release(self) -> None:
        """Give the claim up (the job stays as it is, to be resumed or restarted)."""
        ...


@runtime_checkable
class Reindexer(Protocol):
    """An engine's reindex jobs."""

    async def jobs(self) -> builtins.list[ReindexJob]:
        """The latest job of every collection that had one."""
        ...

    async def start(self, name: str, embedding_model: str, dimension: int) -> ReindexClaim:
        """Begin a reindex of ``name`` to ``embedding_model`` and claim it. A job for the
        same model that stopped (crash, error) is resumed with its vectors; otherwise a new
        job starts from nothing. :class:`ReindexRunning` when a live runner holds the
        collection's job; :class:`~indexes.engine.CollectionGone` when it does not exist."""
        ...

    async def stalled(self) -> builtins.list[ReindexClaim]:
        """Claims on every running job whose runner is gone (a crash, a stopped replica)."""
        ...


@runtime_checkable
class ReindexCapable(Protocol):
    """An engine that can move its collections to another embedding model."""

    @property
    def reindexer(self) -> Reindexer: ...
