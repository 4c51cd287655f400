"""Upstream backend: any OpenAI-compatible server (vLLM, OpenAI, Ollama, llama.cpp).

One pooled ``httpx.AsyncClient`` (opened in the lifespan) carries every request. Streams are
passed through event by event as they arrive. Only connection failures, where nothing was sent
yet, are retried. The upstream's 4xx is passed on in the OpenAI error shape with its status;
its 5xx, malformed answers and broken streams become 502, silence past the read timeout 504.
Every answer and stream event is checked where it enters: a stream event must be a
``chat.completion.chunk`` object, and a stream must end with ``[DONE]`` or with every choice
it started given a ``finish_reason``; one whose body ends before that was cut short
(:class:`UpstreamIncomplete`), so its partial answer is never passed on as a complete one.
Closing a stream (the client went away) closes the upstream response and frees its connection.

httpx's errors become the service's in one place, :func:`map_transport_errors` (one table, as
httpx's own ``map_httpcore_exceptions`` maps httpcore's): no answer within the read timeout is
504 (:class:`UpstreamTimeout`), no connection or any other transport failure 502
(:class:`UpstreamError`). Every call to the upstream runs inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import msgspec

from rag_service.backends.base import AdapterBackend
from rag_service.chat_schemas import message_text
from rag_service.errors import (
    UpstreamError,
    UpstreamIncomplete,
    UpstreamRejected,
    UpstreamTimeout,
)
from rag_service.settings import Settings

__all__ = ["UpstreamBackend", "map_transport_errors"]

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 8192
# After [DONE], how long the end of the upstream's body may take to arrive before the
# connection is closed instead of going back to the pool.
DRAIN_TIMEOUT_S = 0.25

# Failures where the request never reached the upstream: the only ones retried.
NOT_SENT: tuple[type[httpx.TransportError], ...] = (httpx.ConnectError, httpx.ConnectTimeout)

# httpx's errors -> the service's. The first row a failure is an instance of decides, so the
# specific rows come first; the last row catches every other httpx error.
TRANSPORT_ERRORS: tuple[tuple[tuple[type[httpx.HTTPError], ...], type[UpstreamError], str], ...] = (
    (NOT_SENT, UpstreamError, "cannot connect to the upstream server at {url} ({doing}): {exc}"),
    (
        (httpx.TimeoutException,),
        UpstreamTimeout,
        "the upstream server did not answer in time ({doing}): {exc}",
    ),
    ((httpx.HTTPError,), UpstreamError, "the upstream server failed ({doing}): {exc}"),
)


@contextlib.contextmanager
def map_transport_errors(doing: str, url: object) -> Iterator[None]:
    """Raise the service's error for any httpx error inside, from it; ``doing`` and ``url``
    say in the message what failed where."""
    try:
        yield
    except httpx.HTTPError as exc:
        for kinds, error, message in TRANSPORT_ERRORS:
            if isinstance(exc, kinds):
                detail = str(exc) or type(exc).__name__
                raise error(message.format(url=url, doing=doing, exc=detail)) from exc
        raise  # unreachable: the last row matches every httpx error


class UpstreamBackend(AdapterBackend):
    name = "upstream"

    def __init__(
        self,
        settings: Settings,
        *,
        count_text_tokens: Callable[[str], int],
        client: httpx.AsyncClient | None = None,
    ) -> None:
        assert settings.upstream_url
        self.settings = settings
        self._count_text = count_text_tokens
        self._client = client
        self._owns_client = client is None
        self._models: list[str] = [settings.upstream_model] if settings.upstream_model else []
        self._adapters: dict[str, tuple[str, str]] = {}  # name -> (served name, path)
        self._confirmed: dict[str, float] = {}
        self._chat_url_cache: httpx.URL | None = None

    @property
    def context_window(self) -> int:
        return self.settings.context_window or DEFAULT_WINDOW

    def models(self) -> list[str]:
        return list(self._models)

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """An estimate (the upstream's tokenizer is unknown here), padded by 10%."""
        raw = sum(self._count_text(message_text(m)) + 4 for m in messages)
        return int(raw * 1.1) + 8

    def count_texts(self, texts: list[str]) -> list[int]:
        """Per-text estimates, each counted once, for fitting a prompt with arithmetic."""
        return [int((self._count_text(t) + 4) * 1.1) + 1 for t in texts]

    def token_upper_bound(self, messages: list[dict[str, Any]]) -> int:
        """``count_tokens`` with one token per UTF-8 byte: no tokenizer makes more tokens."""
        raw = sum(len(message_text(m).encode()) + 4 for m in messages)
        return int(raw * 1.1) + 8

    async def start(self) -> None:
        if self._client is None:
            s = self.settings
            headers = (
                {"Authorization": f"Bearer {s.upstream_api_key}"} if (s.upstream_api_key) else {}
            )
            self._client = httpx.AsyncClient(
                base_url=str(s.upstream_url).rstrip("/") + "/",
                headers=headers,
                timeout=httpx.Timeout(
                    s.upstream_read_timeout_s, connect=s.upstream_connect_timeout_s
                ),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
        if not self._models:
            try:
                with self._errors("listing models"):
                    resp = await self._client.get("models")
                    resp.raise_for_status()
                self._models = [m["id"] for m in resp.json().get("data", [])][:1]
            except (UpstreamError, ValueError, KeyError, TypeError) as exc:
                log.warning("could not list upstream models (%s); set RAG_UPSTREAM_MODEL", exc)
        log.info(
            "upstream backend %s, model %s", self.settings.upstream_url, self._models or "unknown"
        )

    @property
    def _chat_url(self) -> httpx.URL:
        assert self._client is not None
        if self._chat_url_cache is None:  # resolved once: no URL parsing per request
            self._chat_url_cache = self._client.base_url.join("chat/completions")
        return self._chat_url_cache

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()

    def _errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        return map_transport_errors(doing, self.settings.upstream_url)

    # ---- adapters (vLLM runtime LoRA API) ------------------------------------------------
    # Each load of a name is registered upstream as "name@version", so a new version never
    # shares a name with stale weights; our registry is the truth, and an adapter the upstream
    # lost (it restarted) is registered again before the next request that needs it.
    def check_adapter(self, config: dict[str, Any]) -> None:
        return None  # the upstream checks fit against its base model on load

    @staticmethod
    def _served_name(name: str, version: int) -> str:
        return f"{name}@{version}"

    async def _lora_call(self, endpoint: str, body: dict[str, Any]) -> httpx.Response:
        assert self._client is not None
        with self._errors(endpoint):
            return await self._client.post(endpoint, json=body)

    async def load_adapter(self, name: str, path: str, version: int) -> None:
        served = self._served_name(name, version)
        resp = await self._lora_call("load_lora_adapter", {"lora_name": served, "lora_path": path})
        if resp.status_code == 400 and "already" in resp.text.lower():
            # Another replica sharing this server (and the adapter registry) loaded it first.
            log.info("upstream already serves %s; using it", served)
        elif resp.status_code >= 400:
            detail = resp.text[:300]
            if resp.status_code == 404:
                detail += (
                    " (is the upstream vLLM started with "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora?)"
                )
            raise UpstreamRejected(
                f"upstream refused adapter {served}: {detail}", status_code=400, param="path"
            )
        self._adapters[name] = (served, path)
        self._confirmed[served] = time.monotonic()

    async def unload_adapter(self, name: str, version: int) -> None:
        served = self._served_name(name, version)
        self._adapters.pop(name, None)
        self._confirmed.pop(served, None)
        resp = await self._lora_call("unload_lora_adapter", {"lora_name": served})
        if resp.status_code >= 400 and resp.status_code != 404:
            log.warning(
                "upstream unload of %s answered %s: %s", served, resp.status_code, resp.text[:200]
            )

    async def adapter_model(self, name: str, version: int) -> str:
        """``name@version``, registered again first if the upstream no longer lists it
        (checked at most every 5 s)."""
        served, path = self._adapters[name]
        if time.monotonic() - self._confirmed.get(served, 0.0) < 5.0:
            return served
        assert self._client is not None
        try:
            with self._errors("listing models"):
                resp = await self._client.get("models")
            listed = {m.get("id") for m in resp.json()["data"]}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError(f"the upstream's model list is unreadable: {exc}") from exc
        if served not in listed:
            log.warning("upstream lost adapter %s; registering it again", served)
            await self.load_adapter(name, path, version)
        self._confirmed[served] = time.monotonic()
        return served

    # ---- requests ------------------------------------------------------------------------
    async def _send(self, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        assert self._client is not None
        request = self._client.build_request(
            "POST",
            self._chat_url,
            content=msgspec.json.encode(body),
            headers={"Content-Type": "application/json"},
        )
        attempt = 0
        with self._errors("sending the chat request"):
            while True:
                try:
                    return await self._client.send(request, stream=stream)
                except NOT_SENT:  # nothing reached the upstream: safe to retry
                    if attempt >= self.settings.upstream_retries:
                        raise
                    attempt += 1
                    await asyncio.sleep(0.1 * 2**attempt)

    @staticmethod
    def _error_for(response: httpx.Response, raw: bytes) -> UpstreamError:
        message, etype, param, code = raw.decode(errors="replace")[:500], None, None, None
        try:
            err = json.loads(raw)["error"]
            if isinstance(err, dict):
                message = str(err.get("message") or message)
                etype, param, code = err.get("type"), err.get("param"), err.get("code")
            elif isinstance(err, str):
                message = err
        except (ValueError, KeyError, TypeError):
            pass
        status = response.status_code
        if 400 <= status < 500:
            return UpstreamRejected(
                f"upstream rejected the request: {message}",
                status_code=status,
                param=param,
                error_type=etype,
                code=code,
            )
        return UpstreamError(f"upstream server error {status}: {message}")

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._send({**body, "stream": False}, stream=False)
        if response.status_code >= 400:
            raise self._error_for(response, response.content)
        try:
            data = msgspec.json.decode(response.content)
        except msgspec.DecodeError as exc:
            raise UpstreamError("upstream answered with invalid JSON") from exc
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamError("upstream answer is not a chat.completion object")
        return data

    async def stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        response = await self._send({**body, "stream": True}, stream=True)
        try:
            with self._errors("reading the answer stream"):
                if response.status_code >= 400:
                    raise self._error_for(response, await response.aread())
                lines = response.aiter_lines()
                started: set[int] = set()  # choice indexes seen, and those given a finish_reason
                finished: set[int] = set()
                async for line in lines:
                    if not line or line.startswith(":"):
                        continue
                    if not line.startswith("data:"):
                        if line.startswith(("event:", "id:", "retry:")):
                            continue
                        raise UpstreamError(f"malformed event stream from upstream: {line[:100]!r}")
                    data = line[5:].strip()
                    if data == "[DONE]":
                        await _drain(lines)
                        return
                    try:
                        chunk = msgspec.json.decode(data)
                    except msgspec.DecodeError as exc:
                        raise UpstreamError(
                            f"malformed event stream from upstream: {data[:100]!r}"
                        ) from exc
                    if isinstance(chunk, dict) and "error" in chunk:
                        raise UpstreamError(f"upstream error mid-stream: {chunk['error']}")
                    _track_choices(chunk, data, started, finished)
                    yield chunk
                if not started or started != finished:
                    raise UpstreamIncomplete(
                        "the upstream stream ended early (no [DONE] and no finish_reason): "
                        "the answer is incomplete"
                    )
        finally:
            await response.aclose()


def _track_choices(chunk: Any, data: str, started: set[int], finished: set[int]) -> None:
    """Check that ``chunk`` is a ``chat.completion.chunk`` object (``choices``, when present, a
    list of objects with integer indexes) and note which choices it starts and finishes."""
    choices = chunk.get("choices", []) if isinstance(chunk, dict) else None
    if not isinstance(choices, list):
        raise UpstreamError(
            f"malformed event stream from upstream: not a chat.completion.chunk: {data[:100]!r}"
        )
    for choice in choices:
        index = choice.get("index", 0) if isinstance(choice, dict) else None
        if not isinstance(index, int):
            raise UpstreamError(
                f"malformed event stream from upstream: not a chat.completion.chunk choice: "
                f"{data[:100]!r}"
            )
        started.add(index)
        if choice.get("finish_reason") is not None:
            finished.add(index)


async def _drain(lines: AsyncIterator[str]) -> None:
    """Read what follows ``[DONE]`` (normally only the end of the chunked body) so that the
    connection is reused: a response closed before its end closes its connection, and the
    next request would pay a new TCP (or TLS) connect. An upstream that keeps sending is cut
    off after DRAIN_TIMEOUT_S."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for _ in lines:
                pass
