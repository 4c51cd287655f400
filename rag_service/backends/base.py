"""The protocol every generation backend implements.

A backend receives an OpenAI chat-completions body (a dict, already augmented with sources)
and returns an OpenAI ``chat.completion`` dict, or yields ``chat.completion.chunk`` dicts for a
stream. Errors are raised as :mod:`rag_service.errors` types.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

__all__ = ["ChatBackend", "completion_id"]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


@runtime_checkable
class ChatBackend(Protocol):
    name: str

    @property
    def context_window(self) -> int: ...

    def models(self) -> list[str]: ...

    def count_tokens(self, messages: list[dict[str, Any]]) -> int: ...

    def token_upper_bound(self, messages: list[dict[str, Any]]) -> int:
        """A count never below ``count_tokens``, cheap enough to try first."""
        ...

    def count_texts(self, texts: list[str]) -> list[int]:
        """Token counts of plain texts (each a message or a source), batched."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...
