"""RAFT examples: the service's chunks, sampled; each question shown as the chat path shows it.

Chunks are made again here exactly as the service made them when the documents were stored:
the same chunker (:func:`rag_service.chunking.chunk_offsets`) with the collection's
``chunk_tokens`` / ``chunk_overlap``, over token offsets from the collection's own embedding
model (:meth:`rag_service.embedding.Embedder.offsets`), the way
``KnowledgeBase._chunk`` does. Every search hit is checked against them (same document and
position must mean the same text), so a mismatch is an error, never a silent mislabel.

Sampling is stratified over documents: documents are visited in a seeded order, one chunk of
each per round, until ``--max-chunks``; chunks with fewer than :data:`MIN_CHUNK_WORDS` words
are left out.

An example is the prompt the service builds at chat time, made by the service's own code
(:func:`rag_service.prompting.fit_prompt`, so the same system message and the same "[n] (from
<document, p., §>)" lines), for the question alone: the answering chunk (the *oracle*) at a
random position among distractors, which are the service's search hits for the question
(``top_k`` of them, as chat retrieves) minus the oracle, minus chunks of the same document
that overlap it, minus any chunk that also holds the reference answer. The answer quotes the
reference span and cites the oracle as ``[n]``. In a share ``p_no_oracle`` of the examples of
each split the oracle is left out and the answer is :data:`REFUSAL`.

The split is by chunk: all questions about one chunk go to one split, so no chunk is seen in
training and tested on.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rag_service.chunking import ChunkingConfig, chunk_offsets
from rag_service.locations import locate, without_layout
from rag_service.prompting import DEFAULT_TEMPLATE, PromptSource, fit_prompt
from trainers.evaluate import normalise
from trainers.raft_questions import ChunkRef, QAItem

__all__ = [
    "MIN_CHUNK_WORDS",
    "REFUSAL",
    "ChunkMismatch",
    "Example",
    "answer_text",
    "build_example",
    "hit_source",
    "no_oracle_flags",
    "oracle_in",
    "prompt_messages",
    "reproduce_chunks",
    "sample_chunks",
    "split_by_chunk",
]

MIN_CHUNK_WORDS = 12
REFUSAL = "The sources do not contain the answer to this question."
_LOCATION_KEYS = ("page", "page_end", "section")


class ChunkMismatch(ValueError):
    """The service's chunks differ from the ones made here (another chunker or model)."""


def reproduce_chunks(
    documents: Sequence[dict[str, Any]], config: ChunkingConfig, embedder: Any
) -> list[ChunkRef]:
    """The chunks of ``documents`` (``{"id", "text", "metadata"}`` as the service returns
    them) in document order; ``embedder`` is the collection's model."""
    texts = [d["text"] for d in documents]
    out = []
    for doc, offsets in zip(documents, embedder.offsets(texts), strict=True):
        metadata = doc.get("metadata") or {}
        for c in chunk_offsets(doc["text"], offsets, config):
            out.append(
                ChunkRef(
                    str(doc["id"]),
                    c.position,
                    c.start,
                    c.end,
                    c.text,
                    without_layout(metadata),
                    locate(metadata, c.start, c.end),
                )
            )
    return out


def sample_chunks(chunks: Sequence[ChunkRef], max_chunks: int, seed: int) -> list[ChunkRef]:
    """At most ``max_chunks`` chunks, stratified over documents (one per document per round,
    documents and chunks in a seeded order)."""
    rng = random.Random(seed)
    by_doc: dict[str, list[ChunkRef]] = defaultdict(list)
    for c in chunks:
        if len(c.text.split()) >= MIN_CHUNK_WORDS:
            by_doc[c.document_id].append(c)
    queues = []
    for doc_id in sorted(by_doc):
        queue = list(by_doc[doc_id])
        rng.shuffle(queue)
        queues.append(queue)
    rng.shuffle(queues)
    out: list[ChunkRef] = []
    while len(out) < max_chunks and any(queues):
        for queue in queues:
            if queue and len(out) < max_chunks:
                out.append(queue.pop())
    return out


def hit_source(index: int, hit: dict[str, Any]) -> PromptSource:
    """A search hit as the chat path makes it a source (metadata without layout, location)."""
    return PromptSource(
        index,
        hit["document_id"],
        int(hit["chunk_id"]),
        hit["text"],
        float(hit["score"]),
        hit.get("metadata") or {},
        {k: hit[k] for k in _LOCATION_KEYS if hit.get(k) is not None},
    )


def _chunk_source(chunk: ChunkRef, chunk_id: int) -> PromptSource:
    return PromptSource(
        0, chunk.document_id, chunk_id, chunk.text, 0.0, chunk.metadata, chunk.location
    )


def prompt_messages(
    question: str, sources: Sequence[PromptSource], template: str = DEFAULT_TEMPLATE
) -> list[dict[str, Any]]:
    """The messages the service sends its model for ``question`` with ``sources`` in this
    order, built by the service's own :func:`fit_prompt` (the window is never short here:
    examples longer than the training length are reported by the trainer)."""
    ordered = [
        PromptSource(
            i, s.document_id, s.chunk_id, s.text, float(len(sources) - i), s.metadata, s.location
        )
        for i, s in enumerate(sources, start=1)
    ]
    messages, _ = fit_prompt(
        [{"role": "user", "content": question}],
        ordered,
        template=template,
        count_tokens=lambda _: 0,
        budget=1,
        rag=True,
    )
    return messages


def answer_text(reference: str, index: int) -> str:
    """The reference span with the citation before its final full stop: "X is Y [2]."."""
    span = " ".join(reference.split())
    if span and span[-1] in ".!?":
        return f"{span[:-1]} [{index}]{span[-1]}"
    return f"{span} [{index}]"


def _same_chunk(hit: dict[str, Any], chunk: ChunkRef) -> bool:
    if hit["document_id"] != chunk.document_id or hit.get("position") != chunk.position:
        return False
    if hit["text"] != chunk.text:
        raise ChunkMismatch(
            f"chunk {chunk.position} of {chunk.document_id!r} differs from the service's: "
            "the collection was chunked with other settings or another model than it records"
        )
    return True


def _overlaps(hit: dict[str, Any], chunk: ChunkRef) -> bool:
    return (
        hit["document_id"] == chunk.document_id
        and int(hit.get("start", 0)) < chunk.end
        and int(hit.get("end", 0)) > chunk.start
    )


@dataclass(frozen=True, slots=True)
class Example:
    """One line of the data: the chat messages and what the evaluation needs to score it."""

    messages: list[dict[str, Any]]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "raft": self.meta}


def build_example(
    item: QAItem,
    hits: Sequence[dict[str, Any]],
    *,
    top_k: int,
    with_oracle: bool,
    rng: random.Random,
    template: str = DEFAULT_TEMPLATE,
) -> Example:
    """``item`` shown with ``top_k`` sources: the oracle at a random position among the
    distractors taken from ``hits`` (the service's search results for the question, best
    first), or ``top_k`` distractors and :data:`REFUSAL` when ``with_oracle`` is false."""
    oracle = item.chunk
    rank = next((i for i, h in enumerate(hits, start=1) if _same_chunk(h, oracle)), None)
    reference = normalise(item.answer)
    distractors = [
        h for h in hits if not _overlaps(h, oracle) and reference not in normalise(h["text"])
    ]
    chunk_id = int(hits[rank - 1]["chunk_id"]) if rank else -1
    if with_oracle:
        chosen = [hit_source(0, h) for h in distractors[: top_k - 1]]
        at = rng.randrange(len(chosen) + 1)
        sources = [*chosen[:at], _chunk_source(oracle, chunk_id), *chosen[at:]]
        answer = answer_text(item.answer, at + 1)
        oracle_index: int | None = at + 1
    else:
        sources = [hit_source(0, h) for h in distractors[:top_k]]
        answer = REFUSAL
        oracle_index = None
    messages = prompt_messages(item.question, sources, template)
    messages.append({"role": "assistant", "content": answer})
    meta = {
        "question": item.question,
        "reference": item.answer,
        "key_span": item.key_span,
        "kind": item.kind,
        "document_id": oracle.document_id,
        "position": oracle.position,
        "chunk": oracle.key,
        "oracle_text": oracle.text,
        "oracle_index": oracle_index,
        "sources": len(sources),
        "retrieval_rank": rank,
    }
    return Example(messages, meta)


def oracle_in(sources: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[int]:
    """The indexes (1-based) of ``sources`` (a chat response's) that answer: the oracle chunk
    itself, or another chunk of its document holding the whole reference answer."""
    reference = normalise(meta["reference"])
    return [
        i
        for i, s in enumerate(sources, start=1)
        if s.get("document_id") == meta["document_id"]
        and (s.get("text") == meta["oracle_text"] or reference in normalise(s.get("text", "")))
    ]


def split_by_chunk(
    items: Sequence[QAItem], *, val: float, test: float, seed: int
) -> dict[str, list[QAItem]]:
    """train / val / test by chunk: every question of a chunk in one split. ``ValueError``
    when there are too few chunks to give each requested split one chunk and train two."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError("--val and --test must be shares in [0, 1) that sum below 1")
    keys = sorted({i.chunk.key for i in items})
    n_val = max(1, round(len(keys) * val)) if val > 0 else 0
    n_test = max(1, round(len(keys) * test)) if test > 0 else 0
    if len(keys) - n_val - n_test < 2:
        raise ValueError(
            f"too few chunks with questions ({len(keys)}) for the requested split "
            f"(val {val:g}, test {test:g}): need at least {n_val + n_test + 2}; raise "
            "--max-chunks, add documents, or lower --val/--test"
        )
    random.Random(seed).shuffle(keys)
    where = {k: "test" for k in keys[:n_test]}
    where.update({k: "val" for k in keys[n_test : n_test + n_val]})
    parts: dict[str, list[QAItem]] = {"train": [], "val": [], "test": []}
    for item in items:
        parts[where.get(item.chunk.key, "train")].append(item)
    return parts


def no_oracle_flags(n: int, share: float, rng: random.Random) -> list[bool]:
    """``n`` flags, exactly ``round(n * share)`` of them True, at seeded places."""
    flags = [i < round(n * share) for i in range(n)]
    rng.shuffle(flags)
    return flags
