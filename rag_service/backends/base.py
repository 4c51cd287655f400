"""The protocols generation backends implement: one for chat, one more for adapters.

A backend receives an OpenAI chat-completions body (a dict, already augmented with sources)
and returns an OpenAI ``chat.completion`` dict, or yields ``chat.completion.chunk`` dicts for a
stream. Errors are raised as :mod:`rag_service.errors` types.

Serving fine-tuned adapters is a capability of its own, added by subclassing the protocol
(the way Litestar's ``NamespacedStore`` extends ``Store``)::

    ChatBackend          the base model: count tokens, complete, stream
    └── AdapterBackend   + check, load and unload adapters, name them for a request

Both built-in backends are adapter backends and say so by subclassing it, so the type checker
holds them to it. :class:`~rag_service.adapters.AdapterManager` takes an ``AdapterBackend``
and is the only caller of its adapter methods; the app gives a backend without the capability
no manager, so no request or call site needs to ask what a backend can do.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from typing import Any, Protocol, runtime_checkable

__all__ = ["AdapterBackend", "ChatBackend", "completion_id"]


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

    def stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The answer's chunks; closing the generator (``aclose``) stops the generation."""
        ...


@runtime_checkable
class AdapterBackend(ChatBackend, Protocol):
    """A backend that serves fine-tuned (LoRA) adapters beside its base model, chosen per
    request by ``model``. Files, config and registry are checked by the manager first."""

    def check_adapter(self, config: dict[str, Any]) -> None:
        """Refuse (InvalidRequest, ``param="path"``) a checked LoRA config this backend
        cannot serve, before anything is loaded. Blocking; changes nothing."""
        ...

    async def load_adapter(self, name: str, path: str, version: int) -> None:
        """Serve ``path`` as adapter ``name``; a failed load leaves the backend as it was."""
        ...

    async def unload_adapter(self, name: str, version: int) -> None:
        """Stop serving ``name`` (no request uses it any more: the manager waited)."""
        ...

    async def adapter_model(self, name: str, version: int) -> str:
        """The ``model`` to send for loaded adapter ``name``, once the backend is sure to
        serve it (an upstream that lost it since is given it again)."""
        ...
