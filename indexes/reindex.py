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
   service embeds again with the new one. Before it holds writers off, the swap catches up
   (:func:`catch_up`) pass after pass while writes go on, until a pass finds nothing new (at
   most :data:`CATCH_UP_ROUNDS` passes; each is shorter than the one before, as it has only
   what writes added during that one); writers then wait only for the rest that the last
   pass left (and, with PostgreSQL, for the rewrite of the rows).

A request for the model of the collection's latest job resumes that job unless it is done;
any other starts a new one (:func:`decide_resume`).

A job is *claimed* by the one runner that works on it: :class:`ReindexRunning` answers
anyone else. The embedded engine's claims live in its one process; PostgreSQL's are session
advisory locks on a connection of the runner, released by the server when that process
dies, so any replica may take over a job whose runner is gone (:meth:`Reindexer.stalled`).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from indexes.engine import StaleWrite, StorageError
from indexes.types import CollectionRow

__all__ = [
    "CATCH_UP_BATCH",
    "CATCH_UP_ROUNDS",
    "JOB_STATES",
    "Embed",
    "JobState",
    "ModelChanged",
    "ReindexCapable",
    "ReindexClaim",
    "ReindexJob",
    "ReindexRunning",
    "Reindexer",
    "Resumption",
    "catch_up",
    "decide_resume",
]

JobState = Literal["running", "done", "failed"]
JOB_STATES: tuple[JobState, ...] = ("running", "done", "failed")
CATCH_UP_BATCH = 256  # keys the swap embeds and stores per step of its catch-up
CATCH_UP_ROUNDS = 8  # catch-up passes at most while writes go on, before writers are held off

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

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> ReindexJob:
        """A job from a row of the engines' job query: id, collection name, collection id,
        target model, dimension, source model, state, done, total, error, and the times of
        creation and last change in epoch seconds."""
        return cls(
            int(r[0]),
            str(r[1]),
            int(r[2]),
            str(r[3]),
            int(r[4]),
            str(r[5]),
            r[6],
            int(r[7]),
            int(r[8]),
            r[9],
            float(r[10]),
            float(r[11]),
        )


# What a request does with the collection's latest job: go on with it, or start a new job
# (first marking the latest, still running for another model, failed).
Resumption = Literal["resume", "replace", "new"]


def decide_resume(
    latest: tuple[str, int, str] | None, embedding_model: str, dimension: int
) -> Resumption:
    """The rule of :meth:`Reindexer.start`, given the collection's latest job as
    ``(target model, dimension, state)`` (None: it never had one). ``"resume"``: the same
    target and not done, so its shadow vectors are kept. ``"replace"``: a job for another
    target is still running; it is marked failed and a new one starts. ``"new"``: a new job
    starts (its shadow vectors from nothing)."""
    if latest is None:
        return "new"
    model, dim, state = latest
    if (model, int(dim)) == (embedding_model, int(dimension)) and state != "done":
        return "resume"
    return "replace" if state == "running" else "new"


async def catch_up(claim: ReindexClaim, embed: Embed, limit: int = CATCH_UP_BATCH) -> int:
    """Embed and store, ``limit`` at a time, every key of the claim's collection that has no
    shadow vector; how many. Writes that go on meanwhile may leave more behind."""
    count, after = 0, 0
    while batch := await claim.pending(after, limit):
        keys = [k for k, _ in batch]
        await claim.store(keys, await embed([t for _, t in batch]))
        count += len(keys)
        after = keys[-1]
    return count


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
        """Catch up on what is still missing (``embed`` makes those vectors: while writes go
        on, then the small rest with writers held off), then switch model, dimension and
        every vector in one transaction; the collection's new row.
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
