"""/v1/collections: list, create, change search defaults, delete."""

from __future__ import annotations

import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.di import Provide
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from indexes.types import CollectionRow
from rag_service.dependencies import provide_kb
from rag_service.keys import Principal
from rag_service.knowledge import KnowledgeBase
from rag_service.openapi import error_responses
from rag_service.schemas import (
    CollectionCreate,
    CollectionInfo,
    CollectionList,
    CollectionUpdate,
    NamePath,
    SearchDefaults,
)

__all__ = ["CollectionController", "collection_info"]


def collection_info(row: CollectionRow) -> CollectionInfo:
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
    )


class CollectionController(Controller):
    path = "/collections"
    dependencies = {"kb": Provide(provide_kb, sync_to_thread=False)}

    @get("/", opt={"access": "key"}, responses=error_responses())
    async def list_collections(self, kb: KnowledgeBase, principal: Principal) -> CollectionList:
        """The collections this key can read."""
        rows = [r for r in await kb.list_collections() if principal.allows("read", r.name)]
        return CollectionList(data=[collection_info(r) for r in rows])

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
        "fusion"}}``); a request's own values still win over them."""
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
