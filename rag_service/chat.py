"""RAG chat: OpenAI request -> retrieval -> augmented prompt -> backend -> answer with sources.

Everything that can be refused (bad fields, unknown model or collection, a prompt that cannot
fit) is refused before the backend is called, so nothing is sent upstream for a bad request.
For a stream the first chunk is fetched before the response starts, so a backend that fails at
once still gets a proper HTTP error status; later failures end the stream with an error event.

With ``rag.citations: "verify"`` the answer's citations are checked against the sources once
it is complete (:mod:`rag_service.citations`): a whole answer is rewritten and carries
``citations`` and ``sources[].cited``; a stream passes its tokens on as they come, holds back
only its closing chunks (finish_reason, usage) and adds the verdicts to the last of them. The
sentences are embedded through the micro-batcher, so the event loop never waits on a model;
a check that fails leaves the answer as it was, with ``citations_error`` saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from rag_service.adapters import AdapterManager
from rag_service.backends.base import ChatBackend
from rag_service.chat_schemas import ChatRequest, RagOptions, message_text
from rag_service.citations import CitationPolicy, Verification, verify
from rag_service.errors import (
    CollectionNotFound,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    RagError,
    UpstreamError,
    error_body,
)
from rag_service.keys import Principal
from rag_service.knowledge import KnowledgeBase
from rag_service.locations import locate, without_layout
from rag_service.model_identity import content_hash
from rag_service.prompting import DEFAULT_TEMPLATE, PromptSource, fit_prompt, retrieval_query
from rag_service.settings import Settings

__all__ = ["ChatService", "PreparedChat"]

log = logging.getLogger(__name__)

# Conversations (with their sources) up to this size are fitted on the event loop.
INLINE_PROMPT_CHARS = 16_000


@dataclass(slots=True)
class PreparedChat:
    body: dict[str, Any]
    sources: list[PromptSource]
    stream: bool
    include_usage: bool
    adapter: str | None = None  # the adapter ``model`` names (None: the base model)
    # What retrieval did, for the response's ``retrieval`` field: the collection, whether it
    # was searched, and why not (so an answer without sources is never silently so).
    retrieval: dict[str, Any] | None = None
    citations: str = "model"  # "verify": check the answer's [n] against the sources


class ChatService:
    def __init__(
        self,
        settings: Settings,
        kb: KnowledgeBase,
        backend: ChatBackend,
        adapters: AdapterManager | None = None,
    ) -> None:
        self.settings = settings
        self.kb = kb
        self.backend = backend
        self.adapters = adapters
        self.template = (
            settings.prompt_template.read_text(encoding="utf-8")
            if settings.prompt_template
            else DEFAULT_TEMPLATE
        )
        if "{sources}" not in self.template:
            raise ValueError("RAG_PROMPT_TEMPLATE must contain {sources}")
        self.citation_policy = CitationPolicy(
            threshold=settings.citation_threshold, margin=settings.citation_margin
        )

    def models(self) -> list[dict[str, Any]]:
        """The OpenAI model list; models on disk carry the hash of their files
        (:mod:`rag_service.model_identity`: read once, so call it off the event loop)."""
        created = int(time.time())
        base = self.backend.models()
        out = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "rag-service",
                "root": name,
                "parent": None,
            }
            for name in base
        ]
        if self.adapters is not None:
            out += [
                {
                    "id": a.name,
                    "object": "model",
                    "created": a.loaded_at,
                    "owned_by": "rag-service",
                    "root": a.name,  # a name and a hash, never a path on this machine
                    "parent": base[0] if base else None,
                    "content_hash": content_hash(a.path),
                }
                for a in self.adapters.registry.list()
            ]
        # The embedding models too, as OpenAI clients look for the embeddings model here.
        out += [
            {
                "id": m.id,
                "object": "model",
                "created": created,
                "owned_by": "rag-service",
                "root": m.id,
                "parent": None,
                "content_hash": content_hash(m.path),
                "type": "embedding",
                "dimension": m.dimension,
            }
            for m in self.kb.models.loaded()
        ]
        return out

    # ---- preparation -------------------------------------------------------------------
    def _model(self, request: ChatRequest) -> tuple[str | None, str | None]:
        """The model to answer with, and the adapter it names (None: the base model)."""
        served = self.backend.models()
        if request.model is None:
            return (served[0] if served else None), None
        if self.adapters is not None and self.adapters.serves(request.model):
            return request.model, request.model
        if served and request.model not in served:
            raise ModelNotFound(
                f"model {request.model!r} is not served here; available: {', '.join(served)}",
                param="model",
            )
        return request.model, None

    def _completion_budget(self, request: ChatRequest) -> int:
        window = self.backend.context_window
        limit = request.token_limit
        field = (
            "max_completion_tokens" if request.max_completion_tokens is not None else ("max_tokens")
        )
        if limit is not None:
            if limit <= 0:
                raise InvalidRequest(f"{field} must be positive", param=field)
            if limit >= window:
                raise InvalidRequest(
                    f"{field} is {limit} but the model's context window is {window} tokens",
                    param=field,
                )
            return limit
        return min(self.settings.max_new_tokens, window // 2)

    def _check_size(self, request: ChatRequest) -> int:
        """Characters in the conversation; past ``max_chat_chars`` the request is refused."""
        limit = self.settings.max_chat_chars
        chars = 0
        for m in request.messages:
            chars += len(message_text(m))
            if chars > limit:
                raise PayloadTooLarge(
                    f"the messages hold more than {limit} characters (RAG_MAX_CHAT_CHARS); "
                    "shorten the conversation",
                    param="messages",
                )
        return chars

    @staticmethod
    def _check_local(request: ChatRequest) -> None:
        """The local model takes text turns of system, user and assistant only."""
        for i, m in enumerate(request.messages):
            if m.role not in ("system", "developer", "user", "assistant"):
                raise InvalidRequest(
                    f"the local backend does not support role {m.role!r}",
                    param=f"messages[{i}].role",
                )
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                raise InvalidRequest(
                    "the local backend takes text content parts only",
                    param=f"messages[{i}].content",
                )

    async def _retrieve(
        self, body: dict[str, Any], options: RagOptions, principal: Principal | None = None
    ) -> tuple[bool, list[PromptSource], dict[str, Any]]:
        """Whether retrieval applies, the sources, and what happened (``retrieval``)."""
        collection = options.collection or self.settings.rag_collection
        if not options.enabled:
            return False, [], {"collection": None, "searched": False, "reason": "disabled"}
        if principal is not None:  # before the lookup, so a refusal says nothing of existence
            principal.require("read", collection, param="rag.collection")
        if await self.kb.engine.lookup(collection) is None:
            if options.collection is not None:
                raise CollectionNotFound(
                    f"collection {collection!r} does not exist", param="rag.collection"
                )
            # Nothing ingested into the default collection yet: the model is told no context
            # was found, and the response says no collection was searched.
            missing = {"collection": collection, "searched": False, "reason": "no_collection"}
            return True, [], missing
        query = retrieval_query(body["messages"])
        if query is None:
            return True, [], {"collection": collection, "searched": False, "reason": "no_query"}
        try:
            hits, _ = await self.kb.search(
                collection,
                query[-self.settings.max_query_chars :],
                top_k=options.top_k or self.settings.rag_top_k,
                filter=options.filter,
                min_score=options.min_score,
                mode=options.mode,
                alpha=options.alpha,
                fusion=options.fusion,
                rerank=options.rerank,
                rerank_depth=options.rerank_depth,
            )
        except RagError as exc:
            if exc.param and not exc.param.startswith("rag."):
                exc.param = f"rag.{exc.param}"
            raise
        sources = [
            PromptSource(
                i,
                h.hit.document_id,
                h.hit.chunk_id,
                h.hit.text,
                round(h.score, 6),
                without_layout(h.hit.metadata),
                locate(h.hit.metadata, h.hit.start, h.hit.end),
            )
            for i, h in enumerate(hits, start=1)
        ]
        return True, sources, {"collection": collection, "searched": True}

    async def prepare(
        self, request: ChatRequest, body: dict[str, Any], *, principal: Principal | None = None
    ) -> PreparedChat:
        """Check and build the request for the backend; ``principal`` (None: no key checks)
        must be able to read the collection retrieval searches."""
        model, adapter = self._model(request)
        completion = self._completion_budget(request)
        if not any(m.role == "user" for m in request.messages):
            raise InvalidRequest("messages must contain a user message", param="messages")
        if self.backend.name == "local":
            self._check_local(request)
        chars = self._check_size(request)
        options = request.rag or RagOptions()
        rag, sources, retrieval = await self._retrieve(body, options, principal)
        fit = functools.partial(
            fit_prompt,
            list(body["messages"]),
            sources,
            template=self.template,
            count_tokens=self.backend.count_tokens,
            upper_bound=self.backend.token_upper_bound,
            count_texts=self.backend.count_texts,
            budget=self.backend.context_window - completion,
            rag=rag,
        )
        # Counting tokens is linear in the conversation; a long one is counted on a worker
        # thread so it never stalls the event loop, a short one costs less than the hand-off.
        chars += sum(len(s.text) for s in sources)
        messages, used = await asyncio.to_thread(fit) if chars > INLINE_PROMPT_CHARS else fit()
        out = {k: v for k, v in body.items() if k != "rag"}
        out["messages"] = messages
        if model is not None:
            out["model"] = model
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        citations = options.citations or self.settings.citations
        return PreparedChat(out, used, request.stream, include_usage, adapter, retrieval, citations)

    # ---- answering ---------------------------------------------------------------------
    async def _acquire(self, prepared: PreparedChat) -> dict[str, Any]:
        """The body for the backend; an adapter stays held (not unloaded) until _release."""
        if prepared.adapter is None or self.adapters is None:
            return prepared.body
        return {**prepared.body, "model": await self.adapters.acquire(prepared.adapter)}

    def _release(self, prepared: PreparedChat) -> None:
        if prepared.adapter is not None and self.adapters is not None:
            self.adapters.release(prepared.adapter)

    async def complete(self, prepared: PreparedChat) -> dict[str, Any]:
        body = await self._acquire(prepared)
        try:
            response = await self.backend.complete(body)
        finally:
            self._release(prepared)
        if prepared.adapter is not None:
            response["model"] = prepared.adapter
        response["sources"] = [s.to_dict() for s in prepared.sources]
        response["retrieval"] = prepared.retrieval
        if prepared.citations == "verify":
            await self._verify_response(prepared, response)
        return response

    # ---- citations ---------------------------------------------------------------------
    async def _verification(self, prepared: PreparedChat, answer: str) -> Verification:
        """The verdicts on ``answer``'s citations; sentences and sources are embedded by the
        searched collection's model, through its micro-batcher (interactive lane)."""
        collection = (prepared.retrieval or {}).get("collection")
        step = self.settings.interactive_max_texts

        async def embed(texts: list[str]) -> np.ndarray:
            # Only called when there are sources, so a collection was searched.
            model = await self.kb.model_for((await self.kb.collection(str(collection))).row)
            parts = await asyncio.gather(
                *(
                    self.kb.embed_queries(texts[i : i + step], model)
                    for i in range(0, len(texts), step)
                )
            )
            return np.concatenate([vectors for vectors, _ in parts])

        texts = [s.text for s in prepared.sources]
        return await verify(answer, texts, embed, self.citation_policy)

    async def _verify_response(self, prepared: PreparedChat, response: dict[str, Any]) -> None:
        """Rewrite the answer's citations and add the verdicts (``citations_error`` instead,
        with the answer untouched, when the check fails)."""
        choices = response.get("choices") or [{}]
        message = choices[0].get("message") or {}
        content = message.get("content")
        try:
            verification = await self._verification(
                prepared, content if isinstance(content, str) else ""
            )
        except Exception as exc:  # the answer stands without verdicts
            log.exception("citation check failed")
            response["citations_error"] = _check_failed(exc)
            return
        text, citations = verification.rewritten()
        if isinstance(content, str):
            message["content"] = text
        cited = verification.cited()
        for source in response["sources"]:
            source["cited"] = cited.get(source["index"], False)
        response["citations"] = [c.to_dict() for c in citations]

    async def _stream_verdicts(self, prepared: PreparedChat, answer: str) -> dict[str, Any]:
        """What the final chunk of a verified stream carries (offsets into the text as
        streamed, which is not rewritten)."""
        try:
            verification = await self._verification(prepared, answer)
        except Exception as exc:
            log.exception("citation check failed")
            return {"citations_error": _check_failed(exc)}
        cited = verification.cited()
        return {
            "citations": [c.to_dict() for c in verification.as_written()],
            "sources": [{"index": s.index, "cited": cited[s.index]} for s in prepared.sources],
        }

    async def open_stream(self, prepared: PreparedChat) -> AsyncIterator[bytes]:
        """Start the backend stream (errors raise here) and return the SSE byte stream."""
        chunks = self.backend.stream(await self._acquire(prepared))
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            self._release(prepared)
            raise
        return self._sse(first, chunks, prepared)

    async def _sse(
        self,
        first: dict[str, Any] | None,
        chunks: AsyncGenerator[dict[str, Any], None],
        prepared: PreparedChat,
    ) -> AsyncIterator[bytes]:
        payloads = self._payloads(first, chunks, prepared)
        async with contextlib.aclosing(payloads):
            if prepared.citations == "verify":
                async for event in self._verified(payloads, prepared):
                    yield event
            else:
                async for payload in payloads:
                    yield _event(payload)
        yield b"data: [DONE]\n\n"

    async def _payloads(
        self,
        first: dict[str, Any] | None,
        chunks: AsyncGenerator[dict[str, Any], None],
        prepared: PreparedChat,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The stream's chunks as sent (sources on the first), then an error body if the
        backend broke it off."""
        local_usage = self.backend.name == "local"
        usage: dict[str, Any] | None = None
        try:
            if first is not None:
                first["sources"] = [s.to_dict() for s in prepared.sources]
                first["retrieval"] = prepared.retrieval
                if prepared.adapter is not None:
                    first["model"] = prepared.adapter
                yield first
                async for chunk in chunks:
                    if prepared.adapter is not None:
                        chunk["model"] = prepared.adapter
                    if local_usage and "usage" in chunk:
                        usage = chunk.pop("usage")
                    yield chunk
            if local_usage and prepared.include_usage and usage is not None and first:
                yield {
                    "id": first["id"],
                    "object": "chat.completion.chunk",
                    "created": first["created"],
                    "model": first["model"],
                    "choices": [],
                    "usage": usage,
                }
        except UpstreamError as exc:
            log.warning("stream ended by backend error: %s", exc.message)
            yield error_body(exc.message, exc.error_type, None, exc.code)
        finally:
            await chunks.aclose()
            self._release(prepared)

    async def _verified(
        self, payloads: AsyncIterator[dict[str, Any]], prepared: PreparedChat
    ) -> AsyncIterator[bytes]:
        """Pass the chunks on as they come, except the closing ones (finish_reason, usage),
        which are held until the answer is checked; the last of them carries the verdicts."""
        parts: list[str] = []
        held: list[dict[str, Any]] = []
        last: dict[str, Any] | None = None
        async for payload in payloads:
            if "error" in payload and "choices" not in payload:  # broken off: no verdicts
                for chunk in held:
                    yield _event(chunk)
                yield _event(payload)
                return
            last = payload
            choices = payload.get("choices") or []
            for choice in choices:
                content = (choice.get("delta") or {}).get("content")
                if choice.get("index", 0) == 0 and isinstance(content, str):
                    parts.append(content)
            if not choices or any(c.get("finish_reason") for c in choices):
                held.append(payload)
                continue
            for chunk in held:
                yield _event(chunk)
            held.clear()
            yield _event(payload)
        if last is None:  # an empty stream: nothing was said, nothing to check
            return
        if not held:
            held.append(
                {
                    "id": last.get("id"),
                    "object": "chat.completion.chunk",
                    "created": last.get("created"),
                    "model": last.get("model"),
                    "choices": [],
                }
            )
        held[-1].update(await self._stream_verdicts(prepared, "".join(parts)))
        for chunk in held:
            yield _event(chunk)


def _check_failed(exc: Exception) -> str:
    return f"the citations could not be checked ({type(exc).__name__}); the answer is unchanged"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"
