"""Retrieval query, augmented prompt and fitting it into the model's context window.

Retrieval query rule: the text of the last user message; when that message is short (fewer
than six words) or refers back (starts with or contains a back-reference such as "it", "that",
"this", "they", "those", "them", "the above", "more", "else", "why", "how so"), the previous user
message is put in front of it, so "and how do I undo that?" still finds the topic asked about.

The sources go into a system message, numbered [1], [2], ... with an instruction to cite them
as [n]; the template is configurable (``RAG_PROMPT_TEMPLATE``, ``{sources}`` marks the spot).
If nothing passed ``min_score`` the model is told that no context was found. Fitting the
window drops the weakest sources first, then the oldest turns, never the last user message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rag_service.chat_schemas import message_text
from rag_service.errors import InvalidRequest

__all__ = [
    "DEFAULT_TEMPLATE",
    "NO_CONTEXT",
    "PromptSource",
    "fit_prompt",
    "retrieval_query",
    "system_message",
]

DEFAULT_TEMPLATE = (
    "You are a helpful assistant. Answer the user's question using the numbered sources below. "
    "Cite the sources you use as [n], where n is the source number. If the sources do not "
    "contain the answer, say that you do not know.\n\nSources:\n{sources}"
)
NO_CONTEXT = (
    "You are a helpful assistant. No relevant context was found in the knowledge base for this "
    "question: say so, and answer only if you are sure."
)

_BACK_REFERENCE = re.compile(
    r"\b(it|its|that|this|these|those|they|them|their|the above|more|else|also|why|how so)\b",
    re.IGNORECASE,
)
_SHORT_WORDS = 6


@dataclass(frozen=True, slots=True)
class PromptSource:
    index: int
    document_id: str
    chunk_id: int
    text: str
    score: float
    metadata: dict[str, Any]
    # page / page_end / section of the chunk when known (rag_service.locations)
    location: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "document_id": self.document_id,
            "chunk_id": self.chunk_id,
            "text": self.text,
            "score": self.score,
            "metadata": self.metadata,
            **self.location,
        }

    def label(self) -> str:
        """``handbook.pdf, p. 14`` (or ``pp. 14-15``, ``§ Install``): what a citation names."""
        parts = [self.document_id]
        page, last = self.location.get("page"), self.location.get("page_end")
        if page is not None:
            parts.append(f"pp. {page}-{last}" if last else f"p. {page}")
        if self.location.get("section"):
            parts.append(f"§ {self.location['section']}")
        return ", ".join(parts)


def retrieval_query(messages: Sequence[dict[str, Any]]) -> str | None:
    users = [message_text(m).strip() for m in messages if m.get("role") == "user"]
    users = [u for u in users if u]
    if not users:
        return None
    last = users[-1]
    if len(users) > 1 and (len(last.split()) < _SHORT_WORDS or _BACK_REFERENCE.search(last)):
        return f"{users[-2]}\n{last}"
    return last


def system_message(sources: Sequence[PromptSource], template: str) -> str:
    if not sources:
        return NO_CONTEXT
    listed = "\n\n".join(f"[{s.index}] (from {s.label()})\n{s.text.strip()}" for s in sources)
    return template.replace("{sources}", listed)


def _renumber(sources: Sequence[PromptSource]) -> list[PromptSource]:
    return [
        PromptSource(i, s.document_id, s.chunk_id, s.text, s.score, s.metadata, s.location)
        for i, s in enumerate(sources, start=1)
    ]


def _with_context(messages: list[dict[str, Any]], context: str) -> list[dict[str, Any]]:
    """Our context system message first, merged with the user's own system message(s)."""
    own = [message_text(m) for m in messages if m.get("role") in ("system", "developer")]
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    content = "\n\n".join([context, *[o for o in own if o.strip()]])
    return [{"role": "system", "content": content}, *rest]


def fit_prompt(
    messages: list[dict[str, Any]],
    sources: list[PromptSource],
    *,
    template: str,
    count_tokens: Callable[[list[dict[str, Any]]], int],
    budget: int,
    rag: bool,
    upper_bound: Callable[[list[dict[str, Any]]], int] | None = None,
    count_texts: Callable[[list[str]], list[int]] | None = None,
) -> tuple[list[dict[str, Any]], list[PromptSource]]:
    """Messages to send and the sources they cite, within ``budget`` prompt tokens.

    ``upper_bound``, when given, is a cheap count never below ``count_tokens`` (for example one
    token per byte): a prompt it already fits is not tokenized at all.

    Otherwise every message and every source is counted once (``count_texts``, batched, when
    given), and what to drop is worked out with arithmetic: the prompt's exact count minus
    the sum of its parts is the template's share, and each drop subtracts its part. The result
    is checked with one exact count; if the parts under-estimated it, the difference is added
    to the template's share and dropping goes on. Work is linear in the conversation's size.
    """
    kept = sorted(sources, key=lambda s: s.score, reverse=True)
    history = list(messages)

    def build() -> list[dict[str, Any]]:
        if not rag:
            return history
        return _with_context(history, system_message(_renumber(kept), template))

    out = build()
    if upper_bound is not None and upper_bound(out) <= budget:
        return out, _renumber(kept)
    exact = count_tokens(out)
    if exact <= budget:
        return out, _renumber(kept)

    # Parts: each source (as listed in the system message) and each droppable turn.
    source_texts = [f"[{s.index}] (from {s.document_id})\n{s.text.strip()}" for s in kept]
    turn_texts = [message_text(m) for m in history]
    if count_texts is not None:
        counts = count_texts(source_texts + turn_texts)
    else:
        counts = [count_tokens([{"role": "user", "content": t}]) for t in source_texts]
        counts += [count_tokens([m]) for m in history]
    source_cost = counts[: len(source_texts)]
    turn_cost = counts[len(source_texts) :]
    last_user = max((i for i, m in enumerate(history) if m.get("role") == "user"), default=-1)
    droppable = [
        i
        for i, m in enumerate(history)
        if i != last_user and m.get("role") not in ("system", "developer")
    ]
    n_sources = len(kept)  # sources kept: the strongest n_sources
    n_dropped = 0  # turns dropped: the oldest n_dropped of ``droppable``
    estimate = exact
    while True:
        while estimate > budget:
            if n_sources:
                n_sources -= 1
                estimate -= source_cost[n_sources]
            elif n_dropped < len(droppable):
                estimate -= turn_cost[droppable[n_dropped]]
                n_dropped += 1
            else:
                break
        gone = set(droppable[:n_dropped])
        history = [m for i, m in enumerate(messages) if i not in gone]
        kept = kept[:n_sources]
        out = build()
        exact = count_tokens(out)
        if exact <= budget:
            return out, _renumber(kept)
        if not n_sources and n_dropped >= len(droppable):
            raise InvalidRequest(
                f"the conversation needs {exact} tokens but the model's window leaves "
                f"{budget} for the prompt; shorten the last message or lower max_tokens",
                param="messages",
            )
        estimate = exact  # the parts under-estimated: go on from the exact count
