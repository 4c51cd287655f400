"""POST /v1/chat/completions (JSON or SSE) and GET /v1/models, in the OpenAI shape."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.status_codes import HTTP_200_OK

from rag_service.chat import ChatService
from rag_service.chat_schemas import ChatRequest
from rag_service.dependencies import provide_chat
from rag_service.keys import Principal
from rag_service.openapi import ChatCompletionOperation, error_responses
from rag_service.request_body import BoundedRequest
from rag_service.streaming import EventStream

__all__ = ["ChatController", "list_models"]


class ChatController(Controller):
    path = "/chat/completions"
    dependencies = {"chat": Provide(provide_chat, sync_to_thread=False)}

    @post(
        "/",
        status_code=HTTP_200_OK,
        opt={"access": "key"},  # retrieval checks read access
        responses=error_responses(404, 502, 504),
        operation_class=ChatCompletionOperation,
    )
    async def create(
        self,
        data: ChatRequest,
        request: Request[Any, Any, State],
        chat: ChatService,
        principal: Principal,
    ) -> Response[Any] | EventStream:
        # ``data`` was validated strictly from the same JSON; the plain dict keeps the fields
        # this service does not know, to forward them upstream untouched.
        body: dict[str, Any] = await cast(BoundedRequest, request).plain_json()
        prepared = await chat.prepare(data, body, principal=principal)
        # The header says at once whether any collection was searched (the body's
        # ``retrieval`` says which and why not), for clients that read no extra fields.
        searched = {"X-RAG-Retrieval": _retrieval_header(prepared.retrieval)}
        if not prepared.stream:
            return Response(await chat.complete(prepared), headers=searched)
        events = await chat.open_stream(prepared)
        return EventStream(
            events,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **searched},
        )


def _retrieval_header(retrieval: dict[str, Any] | None) -> str:
    """``searched; collection=NAME``, or ``none; reason=...`` when no collection was searched."""
    if retrieval is None:
        return "none"
    if retrieval["searched"]:
        return f"searched; collection={retrieval['collection']}"
    return f"none; reason={retrieval['reason']}"


@get(
    "/models",
    dependencies={"chat": Provide(provide_chat, sync_to_thread=False)},
    opt={"access": "key"},
    responses=error_responses(),
)
async def list_models(chat: ChatService) -> dict[str, Any]:
    """Models by name and content hash (hashing the files the first time: off the loop)."""
    return {"object": "list", "data": await asyncio.to_thread(chat.models)}
