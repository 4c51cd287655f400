"""English stop words left out of BM25 queries.

The list is the Snowball English stop list, the one PostgreSQL's ``english`` text search
configuration drops, so the embedded engine (SQLite FTS5) and the postgres engine (tsvector)
match the same words of a question. Words such as "how", "what" and "the" occur in most chunks:
matched, they rank chunks by how often they say "the", and drown the question's content words.
"""

from __future__ import annotations

__all__ = ["STOP_WORDS", "content_words"]

_SNOWBALL_ENGLISH = """
    i me my myself we our ours ourselves you your yours yourself yourselves he him his himself
    she her hers herself it its itself they them their theirs themselves what which who whom
    this that these those am is are was were be been being have has had having do does did
    doing a an the and but if or because as until while of at by for with about against between
    into through during before after above below to from up down in out on off over under again
    further then once here there when where why how all any both each few more most other some
    such no nor not only own same so than too very s t can will just don should now
"""
STOP_WORDS = frozenset(_SNOWBALL_ENGLISH.split())


def content_words(words: list[str]) -> list[str]:
    """``words`` (lower-cased) without stop words and repeats, in their order."""
    return [w for w in dict.fromkeys(words) if w not in STOP_WORDS]
