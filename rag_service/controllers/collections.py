"""/v1/collections: list, create, change search defaults, delete. Each collection shows its
latest reindex (a move to another embedding model, :mod:`rag_service.reindexing`)."""

from __future__ import annotations

import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.di import Provide
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from indexes.reindex import ReindexJob
from indexes.types import CollectionRow
from rag_service.dependencies import provide_kb, provide_reindexing
from rag_service.keys import Principal
from rag_service.knowledge import KnowledgeBase
from rag_service.openapi import error_responses
from rag_service.reindexing import Reindexing
from rag_service.schemas import (
    CollectionCreate,
    CollectionInfo,
    CollectionList,
    CollectionUpdate,
    NamePath,
    ReindexInfo,
    SearchDefaults,
)

__all__ = ["CollectionController", "collection_info", "reindex_info"]


def reindex_info(job: ReindexJob) -> ReindexInfo:
    return ReindexInfo(
        embedding_model=job.embedding_model,
        dimension=job.dimension,
        state=job.state,
        done=job.done,
        total=job.total,
        from_model=job.source_model,
        started_at=int(job.created_at),
        updated_at=int(job.updated_at),
        error=job.error,
    )


def collection_info(row: CollectionRow, reindex: ReindexJob | None = None) -> CollectionInfo:
    return CollectionInfo(
        name=row.name,
        documents=row.documents,
        chunks=row.chunks,
        embedding_model=row.embedding_model,
        dimension=row.dimension,
        index=row.index_factory,
        chunk_tokens=row.chunk_tokens,
        chunk_overlap=row.chunk_overlap,
        created_at=int(row.created_at),
        search=msgspec.convert(row.search, SearchDefaults),
        questions=row.questions,
        reindex=reindex_info(reindex) if reindex is not None else None,
    )


class CollectionController(Controller):
    path = "/collections"
    dependencies = {
        "kb": Provide(provide_kb, sync_to_thread=False),
        "reindexing": Provide(provide_reindexing, sync_to_thread=False),
    }

    @get("/", opt={"access": "key"}, responses=error_responses())
    async def list_collections(
        self, kb: KnowledgeBase, reindexing: Reindexing, principal: Principal
    ) -> CollectionList:
        """The collections this key can read, each with its latest reindex."""
        rows = [r for r in await kb.list_collections() if principal.allows("read", r.name)]
        jobs = await reindexing.jobs()
        return CollectionList(data=[collection_info(r, jobs.get(r.name)) for r in rows])

    @post(
        "/",
        status_code=HTTP_201_CREATED,
        opt={"access": "key"},
        responses=error_responses(409),
    )
    async def create_collection(
        self, data: CollectionCreate, kb: KnowledgeBase, principal: Principal
    ) -> CollectionInfo:
        principal.require("admin", data.name, param="name")
        row = await kb.create_collection(
            data.name,
            index=data.index,
            chunk_tokens=data.chunk_tokens,
            chunk_overlap=data.chunk_overlap,
            search=msgspec.to_builtins(data.search) if data.search else None,
        )
        return collection_info(row)

    @patch("/{name:str}", opt={"access": "admin"}, responses=error_responses(404))
    async def update_collection(
        self, name: NamePath, data: CollectionUpdate, kb: KnowledgeBase
    ) -> CollectionInfo:
        """Replace the collection's search defaults (``{"search": {"mode", "alpha",
        "fusion", "rerank", "rerank_depth"}}``); a request's own values still win over them.
        ``rerank: true`` needs a configured reranker (else 400 naming ``search.rerank``)."""
        row = await kb.configure_collection(name, msgspec.to_builtins(data.search))
        return collection_info(row)

    @delete(
        "/{name:str}",
        status_code=HTTP_204_NO_CONTENT,
        opt={"access": "admin"},
        responses=error_responses(404),
    )
    async def delete_collection(self, name: NamePath, kb: KnowledgeBase) -> None:
        await kb.delete_collection(name)
