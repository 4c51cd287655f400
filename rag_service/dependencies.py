"""Dependency providers: handlers receive services from the app state, never from globals."""

from __future__ import annotations

import hmac
from typing import Any, Literal

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers.base import BaseRouteHandler

from rag_service.chat import ChatService
from rag_service.errors import NotReady, Unauthorized
from rag_service.keys import ALL, MASTER, OPEN, Access, KeyStore, Principal
from rag_service.knowledge import KnowledgeBase
from rag_service.loader_workers import LoaderPool
from rag_service.reindexing import Reindexing
from rag_service.settings import Settings

__all__ = [
    "provide_chat",
    "provide_kb",
    "provide_loaders",
    "provide_principal",
    "provide_reindexing",
    "provide_settings",
    "require_api_key",
    "require_metrics_key",
    "resolve_principal",
]


def provide_kb(state: State) -> KnowledgeBase:
    kb: KnowledgeBase | None = state.get("kb")
    if kb is None:
        error = state.get("startup_error")
        raise NotReady(
            f"service failed to start: {error}"
            if error
            else state.get("waiting_for") or "service is starting: models and indexes are loading"
        )
    return kb


def provide_reindexing(state: State) -> Reindexing:
    reindexing: Reindexing | None = state.get("reindexing")
    if reindexing is None:
        provide_kb(state)  # raises the loading / failed-start error
        raise NotReady("reindexing is not ready")
    return reindexing


def provide_chat(state: State) -> ChatService:
    chat: ChatService | None = state.get("chat")
    if chat is None:
        provide_kb(state)  # raises the loading / failed-start error
        raise NotReady("chat backend is not ready")
    return chat


def provide_loaders(state: State) -> LoaderPool:
    loaders: LoaderPool = state["loaders"]
    return loaders


def provide_settings(state: State) -> Settings:
    settings: Settings = state["settings"]
    return settings


async def require_api_key(connection: ASGIConnection, route_handler: BaseRouteHandler) -> None:
    """Guard for /v1: with RAG_API_KEY set, require ``Authorization: Bearer <key>``.

    The key is the admin key (RAG_API_KEY) or a scoped key (:mod:`rag_service.keys`); the
    principal it resolves to is kept on ``connection.state.principal`` for handlers that
    check more (the body's collection, chat retrieval, the collection list). What a route
    needs is its ``opt``:

    * ``{"access": "key"}``: any valid key; the handler scopes what it does;
    * ``{"access": "read" | "write" | "admin"}``: that access on the path's ``{name}``;
    * ``{"access": ..., "collection": "*"}``: that access on every collection.

    A route without ``access`` needs admin (on ``{name}``, else on every collection), so a
    route added without a marker is closed rather than open; Litestar's generated OPTIONS
    answers (the methods of a path) take any valid key. No key or an unknown one: 401; a
    valid key without the access: 403.

    A coroutine on purpose: Litestar runs a plain function guard on a worker thread, a
    thread hand-off on every request for a check that takes microseconds.
    """
    principal = resolve_principal(connection)
    connection.state.principal = principal
    access: Access | Literal["key"] = route_handler.opt.get("access") or _default_access(
        route_handler
    )
    if access == "key":
        return
    collection = route_handler.opt.get("collection") or connection.path_params.get("name") or ALL
    principal.require(access, collection)


def _default_access(route_handler: BaseRouteHandler) -> Access | Literal["key"]:
    methods = getattr(route_handler, "http_methods", None)
    return "key" if methods == {"OPTIONS"} else "admin"


async def require_metrics_key(connection: ASGIConnection, route_handler: BaseRouteHandler) -> None:
    """Guard for /metrics: like /v1 (its ``opt`` asks admin on every collection) unless
    RAG_METRICS_PUBLIC is set."""
    if connection.app.state["settings"].metrics_public:
        return
    await require_api_key(connection, route_handler)


def resolve_principal(connection: ASGIConnection) -> Principal:
    """Who the bearer token is: the admin key, a scoped key, or everyone when no
    RAG_API_KEY is set. Raises :class:`Unauthorized` for a missing or unknown key."""
    state = connection.app.state
    master: str | None = state["settings"].api_key
    if master is None:
        return OPEN
    header = connection.headers.get("authorization", "")
    scheme, _sep, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        if hmac.compare_digest(token.encode(), master.encode()):
            return MASTER
        keys: KeyStore | None = state.get("keys")
        if keys is None:
            error = state.get("startup_error")
            raise NotReady(f"service failed to start: {error}" if error else "service is starting")
        principal = keys.authenticate(token)
        if principal is not None:
            return principal
    raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")


def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    """The principal :func:`require_api_key` resolved for this request."""
    principal: Principal | None = request.state.get("principal")
    if principal is None:  # a route outside the guard: nobody
        raise Unauthorized("this route resolves no API key")
    return principal
