"""OpenAI chat-completions request, as far as this service reads it.

The request is decoded twice: into :class:`ChatRequest` for validation (bounds, types) and as a
plain dict that is forwarded to an upstream server, so fields this service does not know
(``tools``, ``response_format``, ``logprobs``, vendor extensions) reach it untouched.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from indexes.types import Fusion, SearchMode
from rag_service.schemas import NAME_PATTERN, Alpha, RerankDepth, TopK

__all__ = ["ChatMessage", "ChatRequest", "RagOptions", "StreamOptions", "message_text"]

CollectionName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
MAX_STOP_CHARS = 256
StopText = Annotated[str, msgspec.Meta(max_length=MAX_STOP_CHARS)]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
CitationMode = Annotated[
    Literal["model", "verify"],
    msgspec.Meta(
        description="model: the prompt asks for [n] citations; verify: each [n] is also checked "
        "against source n, unsupported ones dropped, clearly supported ones added (default "
        "RAG_CITATIONS)"
    ),
]


class ContentPart(msgspec.Struct, forbid_unknown_fields=False):
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    text: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=False):
    role: Role
    content: (
        Annotated[str, msgspec.Meta(max_length=1_000_000)]
        | Annotated[list[ContentPart], msgspec.Meta(max_length=256)]
        | None
    ) = None
    name: str | None = None


class RagOptions(msgspec.Struct, forbid_unknown_fields=True):
    collection: CollectionName | None = None
    top_k: TopK | None = None
    filter: Annotated[dict[str, Any], msgspec.Meta(max_length=32)] | None = None
    min_score: float | None = None
    # Left out: the collection's search defaults, then the service's.
    mode: SearchMode | None = None
    alpha: Alpha | None = None
    fusion: Fusion | None = None
    rerank: bool | None = None
    rerank_depth: RerankDepth | None = None
    # Left out: RAG_CITATIONS.
    citations: CitationMode | None = None
    enabled: bool = True


class StreamOptions(msgspec.Struct, forbid_unknown_fields=False):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, forbid_unknown_fields=False):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=1024)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    # At most 4 stop sequences (as OpenAI), each at most MAX_STOP_CHARS characters.
    stop: StopText | Annotated[list[StopText], msgspec.Meta(max_length=4)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] | None = None
    user: str | None = None
    rag: RagOptions | None = None

    @property
    def token_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def message_text(message: ChatMessage | dict[str, Any]) -> str:
    """The text of a message (content-part arrays joined; non-text parts skipped)."""
    content = message.content if isinstance(message, ChatMessage) else message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, ContentPart):
            if part.type == "text" and part.text:
                parts.append(part.text)
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text") or ""))
    return "\n".join(parts)
