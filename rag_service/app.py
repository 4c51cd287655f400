"""The app factory: ``create_app(settings, *, embedder=None, engine=None, backend=None,
http_client=None, loaders=None)``.

Nothing heavy happens at import or in the factory. The lifespan starts loading in the
background (embedding model; the storage engine, which restores its indexes or connects to its
database), so /health answers at once and /ready turns 200 when everything is loaded;
requests that need the knowledge base get 503 until then. Injected dependencies (tests share
one embedder) are used as given and not closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from indexes.engine import AdapterStore, Engine, KeyRowStore, StoreUnavailable
from rag_service.adapters import AdapterManager, AdapterRegistry
from rag_service.backends.base import AdapterBackend, ChatBackend
from rag_service.batching import LaneThreads, MicroBatcher
from rag_service.chat import ChatService
from rag_service.controllers.adapters import AdapterController
from rag_service.controllers.chat import ChatController, list_models
from rag_service.controllers.collections import CollectionController
from rag_service.controllers.documents import DocumentController
from rag_service.controllers.embeddings import EmbeddingsController
from rag_service.controllers.evaluation import EvaluationController
from rag_service.controllers.files import FileController
from rag_service.controllers.health import health, metrics, ready
from rag_service.controllers.keys import KeyController
from rag_service.controllers.playground import playground_router
from rag_service.controllers.questions import QuestionController
from rag_service.controllers.reindex import ReindexController
from rag_service.dependencies import provide_principal, provide_settings, require_api_key
from rag_service.embedders import EmbeddingModels
from rag_service.embedding import Embedder
from rag_service.errors import exception_handlers
from rag_service.keys import EngineKeyRows, KeyRows, KeyStore, SqliteKeyRows
from rag_service.knowledge import KnowledgeBase
from rag_service.loader_workers import LoaderPool
from rag_service.memory import Trimmer
from rag_service.metrics import Metrics
from rag_service.openapi import StrictStructSchemaPlugin, docs_assets_router, openapi_config
from rag_service.reindexing import FOLLOW_S, Reindexing
from rag_service.request_body import BoundedRequest
from rag_service.reranking import open_reranker
from rag_service.settings import Settings
from rag_service.site_guard import site_guard
from rag_service.storage import make_engine

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_PARAM_TYPE = re.compile(r"\{(\w+):[^}]+\}")


def _metrics_middleware(app: ASGIApp) -> ASGIApp:
    """Record latency per route template and status for every HTTP request."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            m: Metrics = scope["litestar_app"].state["metrics"]
            route = scope.get("path_template") or "unmatched"  # type: ignore[typeddict-item]
            method = scope["method"]  # type: ignore[typeddict-item]
            m.http_latency.labels(method, route, str(status)).observe(time.perf_counter() - started)

    return middleware


def _trim_middleware(app: ASGIApp) -> ASGIApp:
    """Give memory back to the OS after a large or long request (:mod:`rag_service.memory`)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await app(scope, receive, send)
        finally:
            length = dict(scope["headers"]).get(b"content-length", b"0")
            size = int(length) if length.isdigit() else 0
            trimmer = scope["litestar_app"].state["trimmer"]
            if trimmer is not None:
                trimmer.after(time.perf_counter() - started, size)

    return middleware


def _allow_middleware(app: ASGIApp) -> ASGIApp:
    """Answer OPTIONS with every method of the path: Litestar's generated OPTIONS handler keeps
    the methods of the first route registered for a path (``GET`` and ``POST`` on one path
    come from two decorators, so it named only one of them)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":  # type: ignore[typeddict-item]
            await app(scope, receive, send)
            return
        template = _PARAM_TYPE.sub(r"{\1}", scope.get("path_template") or "")  # type: ignore[typeddict-item]
        handlers = next(
            (
                methods
                for path, methods in scope["litestar_app"].route_handler_method_map.items()
                if _PARAM_TYPE.sub(r"{\1}", path) == template
            ),
            {},
        )
        allow = ", ".join(sorted({*handlers, "OPTIONS"} - {"asgi", "websocket"})).encode()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and handlers:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", allow)]}  # type: ignore[typeddict-item]
            await send(message)

        await app(scope, receive, send_wrapper)

    return middleware


def _make_backend(
    settings: Settings, embedder: Embedder, http_client: httpx.AsyncClient | None
) -> ChatBackend:
    if settings.resolved_backend == "upstream":
        from rag_service.backends.upstream import UpstreamBackend

        return UpstreamBackend(
            settings,
            client=http_client,
            count_text_tokens=lambda t: len(
                embedder.tokenizer.encode(t, add_special_tokens=False).ids
            ),
        )
    from rag_service.backends.local import LocalBackend

    return LocalBackend(settings)


async def _load(
    app: Litestar,
    settings: Settings,
    embedder: Embedder | None,
    engine: Engine | None,
    backend: ChatBackend | None,
    http_client: httpx.AsyncClient | None,
    stack: contextlib.AsyncExitStack,
    start_loaders: LoaderPool | None,
) -> None:
    state = app.state
    try:
        if embedder is None:
            embedder = await asyncio.to_thread(
                Embedder,
                settings.embedding_model_path,
                device=settings.device,
                runtime=settings.embedding_runtime,
                quantize=settings.embedding_quantize,
                cache_root=settings.cache_path,
            )
        metrics_: Metrics = state["metrics"]
        lanes = LaneThreads(embedder.cores)  # the cores the embedder opened its runtimes for
        stack.callback(lanes.shutdown)  # after every batcher on them has stopped
        batcher = MicroBatcher(
            embedder.encode,
            encode_bulk=embedder.encode_bulk,
            lanes=lanes,
            max_bulk_tokens=settings.max_bulk_tokens,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue=settings.queue_size,
            observer=metrics_,
        )
        await batcher.start()
        stack.push_async_callback(batcher.stop)
        if engine is None:
            engine = make_engine(settings, metrics_)
            await _open_engine(engine, state)
            stack.push_async_callback(engine.close)
        reranker = await open_reranker(settings, batcher, metrics_)  # on batcher's threads
        if reranker is not None:
            stack.push_async_callback(reranker.stop)
        # Every model a collection records serves beside the default one, on its threads.
        models = EmbeddingModels.serving(settings, embedder, batcher)
        stack.push_async_callback(models.close)
        await models.preload(row.embedding_model for row in await engine.list())
        kb = KnowledgeBase(
            settings, engine, embedder, batcher, metrics_, reranker=reranker, models=models
        )
        reindexing = Reindexing(
            settings, engine, models, follow_s=FOLLOW_S if settings.database_url else None
        )
        await reindexing.start()  # resumes the reindex jobs a previous process left running
        stack.push_async_callback(reindexing.close)
        state["reindexing"] = reindexing
        rows: KeyRows = (
            EngineKeyRows(engine)
            if isinstance(engine, KeyRowStore)
            else await asyncio.to_thread(SqliteKeyRows, settings.data_dir / "keys.sqlite3")
        )
        keys = KeyStore(rows)
        stack.callback(keys.close)
        await keys.open()
        if isinstance(rows, EngineKeyRows):  # shared by replicas: follow their changes
            refresher = asyncio.create_task(keys.run_refresh(), name="keys-refresh")
            stack.push_async_callback(_cancel, refresher)
        state["keys"] = keys
        if settings.api_key is None and len(keys):
            log.warning("%d API keys are stored but unused: RAG_API_KEY is not set", len(keys))
        if backend is None:
            backend = _make_backend(settings, embedder, http_client)
            await backend.start()
            stack.push_async_callback(backend.close)
        generator = getattr(backend, "generator", None)  # the local model's batch generator
        if generator is not None:
            generator.on_batch = metrics_.generation_batch_size.observe
            if state["trimmer"] is not None:
                generator.after_batch = state["trimmer"].after_generation
        shared = engine if isinstance(engine, AdapterStore) else None
        adapters = None  # a backend without the capability serves no adapters
        if isinstance(backend, AdapterBackend):
            adapters = AdapterManager(
                settings.adapters_path,
                AdapterRegistry(Path(settings.data_dir) / "adapters.json"),
                backend,
                max_rank=settings.max_lora_rank,
                shared=shared,
            )
            # With a shared store the database is the truth: this replica follows it.
            restored = (
                await adapters.follow_shared()
                if shared is not None
                else await adapters.restore(scan=settings.load_adapters_on_start)
            )
            if restored:
                log.info("adapters loaded: %s", ", ".join(restored))
            if shared is not None:
                follower = asyncio.create_task(adapters.run_follow(), name="adapters-follow")
                stack.push_async_callback(_cancel, follower)
        chat = ChatService(settings, kb, backend, adapters)
        if await engine.lookup(settings.rag_collection) is None:
            log.warning(
                "chat retrieval searches collection %r by default, which does not exist: chats "
                "without rag.collection answer without sources (retrieval.reason "
                "'no_collection') until documents are upserted into it (RAG_RAG_COLLECTION "
                "names another)",
                settings.rag_collection,
            )
        if start_loaders is not None:  # the first upload should not wait for them
            try:
                await asyncio.to_thread(start_loaders.start)
            except Exception as exc:  # uploads will say what fails; search and chat serve
                log.warning("file loader processes did not start: %s", exc)
        state["kb"] = kb
        state["chat"] = chat
        state["adapters"] = adapters
        # What is loaded by now lives as long as the process (models, tokenizers, indexes):
        # freezing it keeps the collector from walking it on every full collection, which
        # otherwise stalls the event loop (a 240 ms pause under 64 concurrent chats).
        gc.collect()
        gc.freeze()
        metrics_.reset_loop_lag_max()
        log.info("ready: %s engine, %d collections", engine.name, len(await engine.list()))
    except Exception as exc:
        log.exception("startup failed")
        state["startup_error"] = f"{type(exc).__name__}: {exc}"


async def _open_engine(engine: Engine, state: State) -> None:
    """Open the storage engine; a database that is not reachable yet is waited for (the
    replica answers 503 meanwhile and comes up by itself once it is)."""
    delay = 1.0
    while True:
        try:
            await engine.open()
            state.pop("waiting_for", None)
            return
        except StoreUnavailable as exc:
            state["waiting_for"] = f"waiting for the database: {exc}"
            log.warning("storage engine not reachable, retrying in %.0f s: %s", delay, exc)
            with contextlib.suppress(Exception):
                await engine.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(
    settings: Settings | None = None,
    *,
    embedder: Embedder | None = None,
    engine: Engine | None = None,
    backend: ChatBackend | None = None,
    http_client: httpx.AsyncClient | None = None,
    loaders: LoaderPool | None = None,
) -> Litestar:
    settings = settings or Settings.from_env()
    own_loaders = loaders is None  # the loader processes start on the first upload
    loader_pool = loaders or LoaderPool.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if not settings.is_loopback and settings.api_key is None:
            log.warning(
                "serving on %s without RAG_API_KEY: anyone who can reach it can read "
                "and change the knowledge base",
                settings.host,
            )
        async with contextlib.AsyncExitStack() as stack:
            loader = asyncio.create_task(
                _load(
                    app,
                    settings,
                    embedder,
                    engine,
                    backend,
                    http_client,
                    stack,
                    loader_pool if own_loaders else None,
                )
            )
            watcher = asyncio.create_task(app.state["metrics"].watch_event_loop())
            try:
                yield
            finally:
                app.state.pop("kb", None)
                app.state.pop("reindexing", None)
                app.state.pop("chat", None)
                app.state.pop("adapters", None)
                app.state.pop("keys", None)
                for task in (loader, watcher):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if own_loaders:
                    await asyncio.to_thread(loader_pool.close)

    v1 = Router(
        path="/v1",
        route_handlers=[
            CollectionController,
            DocumentController,
            FileController,
            EvaluationController,
            QuestionController,
            ReindexController,
            EmbeddingsController,
            ChatController,
            list_models,
            AdapterController,
            KeyController,
        ],
        guards=[require_api_key],
        dependencies={"principal": Provide(provide_principal, sync_to_thread=False)},
    )
    state: dict[str, Any] = {
        "settings": settings,
        "metrics": Metrics(),
        "loaders": loader_pool,
        "trimmer": Trimmer() if settings.trim_memory else None,
    }
    return Litestar(
        route_handlers=[health, ready, metrics, v1, docs_assets_router(), playground_router()],
        lifespan=[lifespan],
        state=State(state),
        dependencies={"settings": Provide(provide_settings, sync_to_thread=False)},
        exception_handlers=exception_handlers(),
        middleware=[site_guard(settings), _trim_middleware, _metrics_middleware, _allow_middleware],
        request_max_body_size=settings.max_body_bytes,
        request_class=BoundedRequest,
        openapi_config=openapi_config(),
        plugins=[StrictStructSchemaPlugin()],
        logging_config=None,  # logging belongs to the process (rag_service.logs), not the app
        debug=False,
    )
