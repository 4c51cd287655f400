"""Token-aware chunking with overlap, using the embedding model's own tokenizer.

A window holds at most ``chunk_tokens`` tokens; consecutive windows share ``overlap`` tokens.
When a window is cut, the cut moves back to the last sentence or paragraph end inside the last
quarter of the window, so chunks rarely end mid-sentence. A chunk never starts or ends inside
a word: a cut (or an overlap's start) that falls between two word pieces of one word moves back
to the word's first piece. Each chunk keeps its position and the character span it covers in
the original text (``text[start:end] == chunk.text``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Chunk", "ChunkingConfig", "chunk_offsets"]

_SENTENCE_END = (".", "!", "?", "\n", ":", ";")


@dataclass(frozen=True, slots=True)
class ChunkingConfig:
    chunk_tokens: int
    overlap: int

    def __post_init__(self) -> None:
        if self.chunk_tokens < 8:
            raise ValueError("chunk_tokens must be at least 8")
        if not 0 <= self.overlap < self.chunk_tokens // 2 + 1:
            raise ValueError("overlap must be >= 0 and at most half of chunk_tokens")


@dataclass(frozen=True, slots=True)
class Chunk:
    position: int
    start: int
    end: int
    text: str
    tokens: int
    first: int = 0  # index of its first token in the document's tokens


def _boundary(text: str, offsets: list[tuple[int, int]], lo: int, hi: int) -> int:
    """Largest token index j in (lo, hi] such that a sentence ends right after token j-1."""
    for j in range(hi, lo, -1):
        end = offsets[j - 1][1]
        if text[end - 1 : end] in _SENTENCE_END or text[end : end + 1] == "\n":
            return j
    return hi


def _word_start(text: str, offsets: list[tuple[int, int]], j: int, lo: int) -> int:
    """``j`` moved back while token j continues the word of token j-1 (no gap between them,
    letters or digits on both sides), but not to ``lo`` or below (a word longer than the
    window is cut where it must be)."""
    k = j
    while k > lo + 1 and k < len(offsets):
        start, prev_end = offsets[k][0], offsets[k - 1][1]
        if start != prev_end or not (text[start - 1 : start].isalnum() and text[start].isalnum()):
            return k
        k -= 1
    return j if k <= lo + 1 else k


def chunk_offsets(text: str, offsets: list[tuple[int, int]], config: ChunkingConfig) -> list[Chunk]:
    """Split ``text`` given its token offsets. Text with no tokens gives one whole chunk."""
    n = len(offsets)
    if n == 0:
        stripped = text.strip()
        return [Chunk(0, 0, len(text), text, 0)] if stripped else []
    size, overlap = config.chunk_tokens, config.overlap
    chunks: list[Chunk] = []
    i = 0
    while i < n:
        j = min(i + size, n)
        if j < n:
            j = _word_start(
                text, offsets, _boundary(text, offsets, i + max(1, (size * 3) // 4), j), i
            )
        start, end = offsets[i][0], offsets[j - 1][1]
        chunks.append(Chunk(len(chunks), start, end, text[start:end], j - i, i))
        if j >= n:
            break
        i = _word_start(text, offsets, max(j - overlap, i + 1), i)
    return chunks
