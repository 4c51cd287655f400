"""/v1/collections/{name}/files: upload files (PDF, Word, HTML, Markdown, reST, text, JSONL)
as documents; the work is :mod:`rag_service.uploads`."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar.di import Provide
from litestar.status_codes import HTTP_200_OK

from rag_service.dependencies import provide_kb, provide_loaders
from rag_service.disconnects import cancel_on_disconnect
from rag_service.knowledge import KnowledgeBase
from rag_service.loader_workers import LoaderPool
from rag_service.openapi import error_responses, multipart_operation
from rag_service.schemas import NamePath, UploadResponse, check_collection_name
from rag_service.settings import Settings
from rag_service.uploads import load_files, read_upload, store_files

__all__ = ["FileController"]


class FileController(Controller):
    path = "/collections/{name:str}"
    dependencies = {
        "kb": Provide(provide_kb, sync_to_thread=False),
        "loaders": Provide(provide_loaders, sync_to_thread=False),
    }

    @post(
        "/files",
        status_code=HTTP_200_OK,
        opt={"access": "write"},
        responses=error_responses(409, 413, 415, 422),
        operation_class=multipart_operation(
            {
                "files": ("binary", True, "one part per file; the id is the file name"),
                "id": ("string", True, "optional: the document id of each file, in order"),
                "metadata": (
                    "string",
                    False,
                    "optional: a JSON object merged into each file's metadata",
                ),
            }
        ),
    )
    async def upload(
        self,
        name: NamePath,
        request: Request[Any, Any, Any],
        kb: KnowledgeBase,
        settings: Settings,
        loaders: LoaderPool,
    ) -> UploadResponse:
        """Store files as documents (created / updated / unchanged, as an upsert); each file
        that cannot be stored is reported with its error, and the others go on."""
        check_collection_name(name)
        form = await request.form()
        uploads, metadata, errors = await read_upload(form, settings)
        # Parsing stops when the client leaves (its loader processes are killed); the upsert
        # that follows is one transaction and is left to finish.
        loaded = await cancel_on_disconnect(
            request.receive, load_files(loaders, uploads, metadata, errors)
        )
        outcomes = await store_files(kb, name, uploads, loaded, errors)
        return UploadResponse(files=outcomes, collection=name)
