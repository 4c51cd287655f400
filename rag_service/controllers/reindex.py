"""/v1/collections/{name}/reindex: move a collection to another embedding model.

``POST {"embedding_model": "<directory in RAG_MODELS_DIR>", "force"?: false}`` checks the
request, starts the job and answers 202 with the collection and its ``reindex`` progress; the
collection keeps serving with its old model until the swap (:mod:`rag_service.reindexing`).
``GET`` answers the latest reindex of the collection (404 when it never had one).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, get, post
from litestar.di import Provide
from litestar.status_codes import HTTP_202_ACCEPTED

from rag_service.controllers.collections import collection_info, reindex_info
from rag_service.dependencies import provide_reindexing
from rag_service.errors import CollectionNotFound, NotFound
from rag_service.openapi import error_responses
from rag_service.reindexing import Reindexing
from rag_service.schemas import CollectionInfo, NamePath, ReindexInfo

__all__ = ["ReindexController", "ReindexRequest"]


class ReindexRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The model to move to: a directory inside the models directory (``RAG_MODELS_DIR``),
    relative or absolute, or the identifier of the default or the bundled model. ``force``
    accepts a model that ``rag-train embed`` flagged worse than its base."""

    embedding_model: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    force: bool = False


class ReindexController(Controller):
    path = "/collections/{name:str}"
    dependencies = {"reindexing": Provide(provide_reindexing, sync_to_thread=False)}

    @post(
        "/reindex",
        status_code=HTTP_202_ACCEPTED,
        opt={"access": "admin"},
        responses=error_responses(404, 409),
    )
    async def start(
        self, name: NamePath, data: ReindexRequest, reindexing: Reindexing
    ) -> CollectionInfo:
        """Re-embed the collection's stored texts with another model in the background, then
        swap atomically; the old model serves until then. 409 while a reindex of the
        collection runs."""
        row, job = await reindexing.request(name, data.embedding_model, force=data.force)
        # The job has started: answer 202 with the row read before it, or, when the store
        # still has it, with today's counters (a drop right after the start is no 404).
        current = next((r for r in await reindexing.engine.list() if r.name == name), row)
        return collection_info(current if current.id == row.id else row, job)

    @get("/reindex", opt={"access": "read"}, responses=error_responses(404))
    async def status(self, name: NamePath, reindexing: Reindexing) -> ReindexInfo:
        """The collection's latest reindex: running (with its progress), done or failed."""
        job = await reindexing.job(name)
        if job is None:
            if await reindexing.engine.lookup(name) is None:
                raise CollectionNotFound(f"collection {name!r} does not exist", param="name")
            raise NotFound(f"collection {name!r} was never reindexed", param="name")
        return reindex_info(job)
