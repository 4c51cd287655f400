"""Upstream backend: any OpenAI-compatible server (vLLM, OpenAI, Ollama, llama.cpp).

One pooled ``httpx.AsyncClient`` (opened in the lifespan) carries every request. Streams are
passed through event by event as they arrive. Only connection failures, where nothing was sent
yet, are retried. The upstream's 4xx is passed on in the OpenAI error shape with its status;
its 5xx, malformed answers and broken streams become 502, silence past the read timeout 504.
Closing a stream (the client went away) closes the upstream response and frees its connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from rag_service.chat_schemas import message_text
from rag_service.errors import UpstreamError, UpstreamRejected, UpstreamTimeout
from rag_service.settings import Settings

__all__ = ["UpstreamBackend"]

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 8192


class UpstreamBackend:
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

    @property
    def context_window(self) -> int:
        return self.settings.context_window or DEFAULT_WINDOW

    def models(self) -> list[str]:
        return list(self._models)

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """An estimate (the upstream's tokenizer is unknown here), padded by 10%."""
        raw = sum(self._count_text(message_text(m)) + 4 for m in messages)
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
                resp = await self._client.get("models")
                resp.raise_for_status()
                self._models = [m["id"] for m in resp.json().get("data", [])][:1]
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                log.warning("could not list upstream models (%s); set RAG_UPSTREAM_MODEL", exc)
        log.info(
            "upstream backend %s, model %s", self.settings.upstream_url, self._models or "unknown"
        )

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()

    # ---- requests ------------------------------------------------------------------------
    async def _send(self, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        assert self._client is not None
        request = self._client.build_request("POST", "chat/completions", json=body)
        attempt = 0
        while True:
            try:
                return await self._client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing reached the upstream: safe to retry.
                if attempt >= self.settings.upstream_retries:
                    raise UpstreamError(
                        f"cannot connect to the upstream server at "
                        f"{self.settings.upstream_url}: {exc}"
                    ) from exc
                attempt += 1
                await asyncio.sleep(0.1 * 2**attempt)
            except httpx.TimeoutException as exc:
                raise UpstreamTimeout("the upstream server did not answer in time") from exc
            except httpx.HTTPError as exc:
                raise UpstreamError(f"upstream request failed: {exc}") from exc

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
            data = response.json()
        except ValueError as exc:
            raise UpstreamError("upstream answered with invalid JSON") from exc
        if not isinstance(data, dict) or "choices" not in data:
            raise UpstreamError("upstream answer is not a chat.completion object")
        return data

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        response = await self._send({**body, "stream": True}, stream=True)
        try:
            if response.status_code >= 400:
                raise self._error_for(response, await response.aread())
            async for line in response.aiter_lines():
                if not line or line.startswith(":"):
                    continue
                if not line.startswith("data:"):
                    if line.startswith(("event:", "id:", "retry:")):
                        continue
                    raise UpstreamError(f"malformed event stream from upstream: {line[:100]!r}")
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise UpstreamError(
                        f"malformed event stream from upstream: {data[:100]!r}"
                    ) from exc
                if isinstance(chunk, dict) and "error" in chunk:
                    raise UpstreamError(f"upstream error mid-stream: {chunk['error']}")
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("the upstream server stopped sending") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream stream broke: {exc}") from exc
        finally:
            await response.aclose()
