"""Moving a collection to another embedding model: the checks, the runners, resuming.

``POST /v1/collections/{name}/reindex {"embedding_model", "force"?}`` comes to
:meth:`Reindexing.request`, which checks everything before anything is written: the
collection exists; the model is a directory inside ``RAG_MODELS_DIR`` (or the default or
bundled model), holds a sentence-transformers embedding model that loads, and is not flagged
``WORSE_THAN_BASE`` by ``rag-train embed`` unless ``force``; it is not the model the
collection has; the collection's index type can hold vectors of its dimension and its chunks
fit the model's window. A model of another dimension is fine: the index is rebuilt for it.
Then the storage engine claims the job (:mod:`indexes.reindex`; 409 while a live runner holds
it) and a runner task works on it in the background, answering 202 at once:

    repeat:  keys without a vector of the new model (engine)
             -> embed them on the bulk lane with the new model
             -> commit the vectors and the progress (engine)      the old index serves
    swap:    catch up and switch model, dimension and vectors in one transaction (engine)

Two sweeps over the keys pick up what writes added meanwhile; the swap catches up on the rest
while writes go on, then embeds what little is left while it holds the collection's writers
off. A runner that stops on an error records it on the job (the old index keeps serving) and
the same request resumes from the vectors stored. A crash leaves the job ``running`` in the
store: at start (and, with a database shared by replicas, every few seconds) a runner is
started for each running job whose runner is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from indexes.engine import CollectionGone, Engine, StorageError, StoreBusy, StoreUnavailable
from indexes.reindex import ReindexCapable, ReindexClaim, Reindexer, ReindexJob, ReindexRunning
from indexes.types import CollectionRow
from rag_service.embedders import WORSE_THAN_BASE, EmbeddingModels, LoadedModel, ModelLoadError
from rag_service.errors import (
    CollectionNotFound,
    InvalidRequest,
    Overloaded,
    RagError,
    ReindexInProgress,
)
from rag_service.settings import Settings

__all__ = ["Reindexing"]

log = logging.getLogger(__name__)

T = TypeVar("T")
SWEEPS = 2
RETRIES = 5  # per step, for a busy or unreachable store
FOLLOW_S = 5.0  # how often a replica of a shared store looks for jobs whose runner is gone


class Reindexing:
    """The reindex jobs of one service: requests, runners, resuming (module docstring)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        models: EmbeddingModels,
        *,
        follow_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.models = models
        self.reindexer: Reindexer | None = (
            engine.reindexer if isinstance(engine, ReindexCapable) else None
        )
        self._follow_s = follow_s
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._follower: asyncio.Task[None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Resume the jobs left running (and follow other replicas' with ``follow_s``);
        the names of the collections whose reindex resumed."""
        resumed = await self.resume()
        if self._follow_s is not None and self.reindexer is not None:
            self._follower = asyncio.create_task(self._follow(), name="reindex-follow")
        return resumed

    async def close(self) -> None:
        """Stop every runner; their jobs stay running in the store, to resume at next start."""
        tasks = [t for t in (self._follower, *self._runners.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._follower = None

    async def resume(self) -> list[str]:
        """Start a runner for every running job whose runner is gone. A claim is given up
        unless a runner took it, whatever stops this partway (an error, a cancellation): a
        claim that nobody runs would keep its job from resuming anywhere."""
        if self.reindexer is None:
            return []
        resumed = []
        claims = await self.reindexer.stalled()
        try:
            while claims:
                job = claims[0].job
                try:
                    model = await self.models.get(job.embedding_model)
                except ModelLoadError as exc:
                    log.error("reindex of %r cannot resume: %s", job.collection, exc)
                    claim = claims.pop(0)
                    try:
                        await claim.fail(f"the model {job.embedding_model} cannot be loaded: {exc}")
                    except StorageError as failed:  # still running: tried again at next start
                        log.warning(
                            "could not record the failure of %r: %s", job.collection, failed
                        )
                    finally:
                        await claim.release()
                    continue
                log.info(
                    "resuming the reindex of %r to %s (%d of %d done)",
                    job.collection,
                    job.embedding_model,
                    job.done,
                    job.total,
                )
                self._spawn(claims.pop(0), model)  # the runner releases it
                resumed.append(job.collection)
        finally:
            for claim in claims:
                with contextlib.suppress(Exception):
                    await claim.release()
        return resumed

    async def _follow(self) -> None:
        assert self._follow_s is not None
        while True:
            await asyncio.sleep(self._follow_s)
            try:
                await self.resume()
            except StorageError as exc:
                log.warning("could not look for stalled reindex jobs: %s", exc)

    # ---- requests -----------------------------------------------------------------------
    async def jobs(self) -> dict[str, ReindexJob]:
        """The latest job of every collection that had one, by collection name."""
        if self.reindexer is None:
            return {}
        return {job.collection: job for job in await self.reindexer.jobs()}

    async def job(self, name: str) -> ReindexJob | None:
        return (await self.jobs()).get(name)

    async def request(
        self, name: str, embedding_model: str, *, force: bool = False
    ) -> tuple[CollectionRow, ReindexJob]:
        """Start (or resume) moving ``name`` to ``embedding_model``; the collection's row as
        read before the start and the job as started."""
        if self.reindexer is None:
            raise InvalidRequest(
                f"the {self.engine.name} storage engine cannot move collections to another "
                "embedding model",
                param="embedding_model",
            )
        collection = await self.engine.lookup(name)
        if collection is None:
            raise CollectionNotFound(f"collection {name!r} does not exist", param="name")
        row = collection.row
        if name in self._runners:
            raise await self._busy(name)
        model_id, path = self.models.choose(embedding_model)
        flag = path / WORSE_THAN_BASE
        if flag.exists() and not force:
            raise InvalidRequest(
                f"embedding_model {embedding_model!r} is flagged {WORSE_THAN_BASE} by rag-train: "
                f'{_first_paragraph(flag)} Send "force": true to use it anyway.',
                param="embedding_model",
            )
        if model_id == row.embedding_model:
            raise InvalidRequest(
                f"collection {name!r} is embedded with {model_id} already (to re-embed with a "
                "retrained model, write it to a new directory)",
                param="embedding_model",
            )
        try:
            model = await self.models.load(model_id, path)
        except ModelLoadError as exc:
            raise InvalidRequest(
                f"embedding_model {embedding_model!r}: {exc}", param="embedding_model"
            ) from exc
        self._check_fits(row.name, row.index_factory, row.chunk_tokens, model)
        try:
            claim = await self.reindexer.start(name, model_id, model.dimension)
        except ReindexRunning:
            raise await self._busy(name) from None
        except CollectionGone as exc:
            raise CollectionNotFound(f"collection {name!r} does not exist", param="name") from exc
        log.info(
            "reindex of %r to %s (dimension %d): %s",
            name,
            model_id,
            model.dimension,
            "resumed" if claim.job.done else "started",
        )
        self._spawn(claim, model)
        return row, claim.job

    def _check_fits(self, name: str, index: str, chunk_tokens: int, model: LoadedModel) -> None:
        """The index can hold the model's vectors, and the collection's chunks fit the model's
        window approximately: ``chunk_tokens`` was counted by the tokenizer of the model the
        collection was chunked for, and another tokenizer counts the same text a little
        differently."""
        try:
            self.engine.check_index(index, model.dimension)
        except ValueError as exc:
            raise InvalidRequest(
                f"collection {name!r} has index {index!r}, which cannot hold the "
                f"{model.dimension}-dimensional vectors of {model.id}: {exc}",
                param="embedding_model",
            ) from exc
        window = model.embedder.content_window
        if chunk_tokens > window:
            raise InvalidRequest(
                f"collection {name!r} has chunks of approximately {chunk_tokens} tokens "
                f"(counted by the tokenizer it was chunked with); {model.id} reads at most "
                f"{window}, so it would embed only part of each chunk",
                param="embedding_model",
            )

    async def _busy(self, name: str) -> ReindexInProgress:
        job = await self.job(name)
        detail = f" (to {job.embedding_model}, {job.done} of {job.total} done)" if job else ""
        return ReindexInProgress(
            f"collection {name!r} is being reindexed already{detail}: wait for it to finish "
            f"(GET /v1/collections/{name}/reindex)",
            param="name",
        )

    # ---- runners ------------------------------------------------------------------------
    def _spawn(self, claim: ReindexClaim, model: LoadedModel) -> None:
        name = claim.job.collection
        self._runners[name] = asyncio.create_task(self._run(claim, model), name=f"reindex-{name}")

    async def _run(self, claim: ReindexClaim, model: LoadedModel) -> None:
        name = claim.job.collection
        step = self.settings.reindex_batch_size
        pause = self.settings.reindex_pause_ms / 1000
        try:
            for _ in range(SWEEPS):
                after = 0
                while batch := await _retry(claim.pending, after, step):
                    keys = [k for k, _ in batch]
                    vectors = await model.embed_bulk([t for _, t in batch])
                    await _retry(claim.store, keys, vectors)
                    after = keys[-1]
                    if pause:
                        await asyncio.sleep(pause)
            row = await _retry(claim.swap, model.embed_bulk)
            log.info(
                "collection %r is embedded with %s now (dimension %d, %d vectors)",
                name,
                row.embedding_model,
                row.dimension,
                claim.job.total,
            )
        except CollectionGone:
            log.info("collection %r was deleted during its reindex", name)
        except ReindexRunning as exc:
            log.info("reindex of %r stopped: %s", name, exc)
        except Exception as exc:  # the top of a background task: whatever stopped it is
            # recorded on the job; the old index keeps serving and the same request resumes.
            message = exc.message if isinstance(exc, RagError) else str(exc)
            log.exception("reindex of %r failed", name)
            with contextlib.suppress(StorageError):
                await claim.fail(f"{type(exc).__name__}: {message}")
        finally:
            await claim.release()
            if self._runners.get(name) is asyncio.current_task():
                del self._runners[name]


async def _retry(step: Callable[..., Awaitable[T]], *args: object) -> T:
    """One step of a job, repeated with backoff while the store is busy or unreachable."""
    for attempt in range(RETRIES):
        try:
            return await step(*args)
        except (StoreBusy, StoreUnavailable, Overloaded) as exc:
            if attempt == RETRIES - 1:
                raise
            delay = 0.5 * 2**attempt
            log.warning("reindex step failed (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _first_paragraph(path: Path) -> str:
    """The first paragraph of a flag file, for the refusal's message."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[:2000]
    except OSError:
        return ""
    first = " ".join(text.strip().split("\n\n", 1)[0].split())
    return first if first.endswith(".") else first + "."
