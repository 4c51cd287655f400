"""/v1/collections/{name}/documents and /search."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.di import Provide
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_204_NO_CONTENT

from indexes.types import DocumentRow
from rag_service.dependencies import provide_kb
from rag_service.knowledge import KnowledgeBase
from rag_service.locations import locate, without_layout
from rag_service.openapi import error_responses
from rag_service.questions import document_questions, matched_by
from rag_service.schemas import (
    DocumentList,
    DocumentOut,
    DocumentStatus,
    NamePath,
    SearchRequest,
    SearchResponse,
    SearchResult,
    UpsertRequest,
    UpsertResponse,
)

__all__ = ["DocumentController"]


def _document_out(doc: DocumentRow, *, with_text: bool) -> DocumentOut:
    return DocumentOut(
        id=doc.id,
        metadata=doc.metadata,
        chunks=doc.chunks,
        updated_at=int(doc.updated_at),
        created_at=int(doc.created_at),
        text=doc.text if with_text else None,
        content_hash=doc.content_hash,
    )


class DocumentController(Controller):
    path = "/collections/{name:str}"
    dependencies = {"kb": Provide(provide_kb, sync_to_thread=False)}

    @post(
        "/documents",
        status_code=HTTP_200_OK,
        opt={"access": "write"},
        responses=error_responses(409),
    )
    async def upsert(
        self, name: NamePath, data: UpsertRequest, kb: KnowledgeBase, debug: bool = False
    ) -> UpsertResponse:
        outcome = await kb.upsert(name, data.documents)
        return UpsertResponse(
            documents=[
                DocumentStatus(id=i, chunks=c, status=s)  # type: ignore[arg-type]
                for i, c, s in outcome.statuses
            ],
            collection=outcome.collection,
            timings_ms=outcome.timings_ms if debug else None,
        )

    @get(
        "/documents",
        opt={"access": "read"},
        responses=error_responses(404),
    )
    async def list_documents(
        self,
        name: NamePath,
        kb: KnowledgeBase,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
        after: Annotated[str | None, Parameter(max_length=512)] = None,
        prefix: Annotated[
            str,
            Parameter(max_length=512, description="only documents whose ids start with this"),
        ] = "",
    ) -> DocumentList:
        docs, has_more = await kb.list_documents(name, limit=limit, after=after, prefix=prefix)
        return DocumentList(
            data=[_document_out(d, with_text=False) for d in docs],
            has_more=has_more,
            first_id=docs[0].id if docs else None,
            last_id=docs[-1].id if docs else None,
        )

    @get(
        "/documents/{doc_id:path}",
        opt={"access": "read"},
        responses=error_responses(404),
    )
    async def get_document(self, name: NamePath, doc_id: str, kb: KnowledgeBase) -> DocumentOut:
        doc = await kb.get_document(name, doc_id[1:])
        out = _document_out(doc, with_text=True)
        out.questions = await document_questions(kb, name, doc.id)
        return out

    @delete(
        "/documents/{doc_id:path}",
        status_code=HTTP_204_NO_CONTENT,
        opt={"access": "write"},
        responses=error_responses(404, 409),
    )
    async def delete_document(self, name: NamePath, doc_id: str, kb: KnowledgeBase) -> None:
        await kb.delete_document(name, doc_id[1:])  # the path param keeps its leading "/"

    @post(
        "/search",
        status_code=HTTP_200_OK,
        opt={"access": "read"},
        responses=error_responses(404, 409),
    )
    async def search(
        self, name: NamePath, data: SearchRequest, kb: KnowledgeBase
    ) -> SearchResponse:
        hits, timings = await kb.search(
            name,
            data.query,
            top_k=data.top_k,
            filter=data.filter,
            min_score=data.min_score,
            mode=data.mode,
            alpha=data.alpha,
            fusion=data.fusion,
            rerank=data.rerank,
            rerank_depth=data.rerank_depth,
        )
        return SearchResponse(
            results=[
                SearchResult(
                    document_id=h.hit.document_id,
                    chunk_id=h.hit.chunk_id,
                    text=h.hit.text,
                    score=round(h.score, 6),
                    metadata=without_layout(h.hit.metadata),
                    position=h.hit.position,
                    start=h.hit.start,
                    end=h.hit.end,
                    **locate(h.hit.metadata, h.hit.start, h.hit.end),
                    scores={k: round(v, 6) for k, v in h.parts.items()} if data.debug else None,
                    matched=matched_by(h.parts) if data.debug else None,
                )
                for h in hits
            ],
            timings_ms=timings if data.debug else None,
        )
