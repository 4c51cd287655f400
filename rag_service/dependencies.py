"""Dependency providers: handlers receive services from the app state, never from globals."""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers.base import BaseRouteHandler

from rag_service.chat import ChatService
from rag_service.errors import NotReady, Unauthorized
from rag_service.knowledge import KnowledgeBase
from rag_service.settings import Settings

__all__ = ["provide_chat", "provide_kb", "provide_settings", "require_api_key"]


def provide_kb(state: State) -> KnowledgeBase:
    kb: KnowledgeBase | None = state.get("kb")
    if kb is None:
        error = state.get("startup_error")
        raise NotReady(
            f"service failed to start: {error}"
            if error
            else "service is starting: models and indexes are loading"
        )
    return kb


def provide_chat(state: State) -> ChatService:
    chat: ChatService | None = state.get("chat")
    if chat is None:
        provide_kb(state)  # raises the loading / failed-start error
        raise NotReady("chat backend is not ready")
    return chat


def provide_settings(state: State) -> Settings:
    settings: Settings = state["settings"]
    return settings


async def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard for /v1: with RAG_API_KEY set, require ``Authorization: Bearer <key>``.

    A coroutine on purpose: Litestar runs a plain function guard on a worker thread, a
    thread hand-off on every request for a check that takes microseconds.
    """
    key = connection.app.state["settings"].api_key
    if key is None:
        return
    header = connection.headers.get("authorization", "")
    scheme, _sep, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
