"""Wire types of the HTTP contract (v1): msgspec Structs with bounds.

Bounds live in the types so bad input is a 400 before any work is done. Limits that are
settings (document length, batch size, top_k) are checked again by the service against the
configured values; the static bounds here are the hard ceilings.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from litestar.params import Parameter

from indexes.types import Fusion, SearchMode
from rag_service.errors import InvalidRequest
from rag_service.ids import DOC_ID_PATTERN, MAX_ID_CHARS

__all__ = [
    "DOC_ID_PATTERN",
    "MAX_QUESTIONS_PER_DOCUMENT",
    "MAX_QUESTION_CHARS",
    "NAME_PATTERN",
    "CollectionCreate",
    "CollectionInfo",
    "CollectionList",
    "CollectionUpdate",
    "DocId",
    "DocumentIn",
    "DocumentList",
    "DocumentOut",
    "DocumentStatus",
    "EmbeddingData",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "FileError",
    "FileOutcome",
    "NamePath",
    "QuestionText",
    "ReindexInfo",
    "SearchDefaults",
    "SearchRequest",
    "SearchResponse",
    "SearchResult",
    "TopK",
    "UploadResponse",
    "UpsertRequest",
    "UpsertResponse",
    "Usage",
    "check_collection_name",
]

# Anchored with \Z, not $ (which also matches before a final newline): see rag_service.ids.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
# A collection (or adapter) name in a URL path, with the same rule, named in the schema.
NamePath = Annotated[str, Parameter(pattern=NAME_PATTERN, max_length=64)]
DocId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=DOC_ID_PATTERN)]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=10_000_000)]
Query = Annotated[str, msgspec.Meta(min_length=1, max_length=100_000, pattern=r"\S")]
Metadata = Annotated[dict[str, Any], msgspec.Meta(max_length=64)]
# Holds a non-blank character; the configured RAG_MAX_QUERY_CHARS is checked by the service.
InputText = Annotated[str, msgspec.Meta(min_length=1, max_length=100_000, pattern=r"\S")]
# The one ceiling of top_k is RAG_MAX_TOP_K, checked by the service for search and chat alike.
TopK = Annotated[int, msgspec.Meta(ge=1, description="at most RAG_MAX_TOP_K (default 100)")]
FilterSpec = Annotated[dict[str, Any], msgspec.Meta(max_length=32)]
Alpha = Annotated[
    float,
    msgspec.Meta(
        ge=0.0,
        le=1.0,
        description="hybrid: weight of the dense ranking (1 - alpha goes to BM25)",
    ),
]
# Known questions of a document (extra search keys, see indexes.questions).
MAX_QUESTIONS_PER_DOCUMENT = 64
MAX_QUESTION_CHARS = 1000
QuestionText = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=r"\S")
]
RerankDepth = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        description="candidates the reranker scores (at least top_k); at most "
        "RAG_MAX_RERANK_DEPTH (default 200)",
    ),
]


def check_collection_name(name: str) -> None:
    """The one rule for collection names, for explicit creation and creation on upsert."""
    if re.fullmatch(NAME_PATTERN, name) is None:
        raise InvalidRequest(
            "collection names are 1-64 characters of letters, digits, '_', '.' and '-', "
            f"starting with a letter or digit; got {name[:80]!r}",
            param="name",
        )


class SearchDefaults(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A collection's search defaults: what a search (or a chat's retrieval) of it uses for
    each field the request leaves out. Unset fields fall back to the service's settings."""

    mode: SearchMode | None = None
    alpha: Alpha | None = None
    fusion: Fusion | None = None
    rerank: bool | None = None
    rerank_depth: RerankDepth | None = None


class CollectionCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    index: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "Flat"
    chunk_tokens: Annotated[int, msgspec.Meta(ge=8, le=8192)] | None = None
    chunk_overlap: Annotated[int, msgspec.Meta(ge=0, le=4096)] | None = None
    search: SearchDefaults | None = None


class CollectionUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """PATCH body: the new search defaults (they replace the old ones as a whole)."""

    search: SearchDefaults


class CollectionInfo(msgspec.Struct):
    name: str
    documents: int
    chunks: int
    embedding_model: str
    dimension: int
    index: str
    chunk_tokens: int
    chunk_overlap: int
    created_at: int
    search: SearchDefaults = msgspec.field(default_factory=SearchDefaults)
    questions: int = 0  # known questions stored as extra keys of the documents
    # The collection's latest move to another embedding model, if any (running, done, failed).
    reindex: ReindexInfo | None = None
    object: str = "collection"


class ReindexInfo(msgspec.Struct, omit_defaults=True):
    """A reindex: the model the collection moves to, its state (``running``, ``done``,
    ``failed``), the vectors of the new model made so far out of ``total`` (the collection's
    chunks and questions), and the error that stopped a failed one."""

    embedding_model: str
    dimension: int
    state: Literal["running", "done", "failed"]
    done: int
    total: int
    from_model: str
    started_at: int
    updated_at: int
    error: str | None = None
    object: str = "collection.reindex"


class CollectionList(msgspec.Struct):
    data: list[CollectionInfo]
    object: str = "list"


class DocumentIn(msgspec.Struct, forbid_unknown_fields=True):
    """A document to upsert. ``questions``: the questions it answers, embedded as extra
    search keys of it. Left out: the stored questions stay (a re-ingest of the text keeps
    them); ``[]`` removes them; a list replaces them (duplicates dropped)."""

    id: DocId
    text: Text
    metadata: Metadata = msgspec.field(default_factory=dict)
    questions: (
        Annotated[list[QuestionText], msgspec.Meta(max_length=MAX_QUESTIONS_PER_DOCUMENT)] | None
    ) = None


class UpsertRequest(msgspec.Struct, forbid_unknown_fields=True):
    documents: Annotated[list[DocumentIn], msgspec.Meta(min_length=1, max_length=10_000)]


class DocumentStatus(msgspec.Struct):
    id: str
    chunks: int
    status: Literal["created", "updated", "unchanged"]


class UpsertResponse(msgspec.Struct, omit_defaults=True):
    documents: list[DocumentStatus]
    collection: str
    timings_ms: dict[str, float] | None = None


class FileError(msgspec.Struct, omit_defaults=True):
    """Why one file of an upload was not stored (the OpenAI error fields)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class FileOutcome(msgspec.Struct, omit_defaults=True):
    """One file of an upload: ``stored`` with its documents' statuses, or ``failed`` with
    the error (nothing of it was written)."""

    filename: str
    status: Literal["stored", "failed"]
    content_type: str | None = None
    title: str | None = None
    pages: int | None = None
    documents: list[DocumentStatus] | None = None
    error: FileError | None = None


class UploadResponse(msgspec.Struct):
    files: list[FileOutcome]
    collection: str
    object: str = "upload"


class DocumentOut(msgspec.Struct, omit_defaults=True):
    id: str
    metadata: dict[str, Any]
    chunks: int
    updated_at: int
    created_at: int
    text: str | None = None
    questions: list[str] | None = None  # the document's known questions (GET of one document)
    # sha256 of the text: a client can tell whether its copy differs without fetching the text.
    content_hash: str | None = None
    object: str = "document"


class DocumentList(msgspec.Struct):
    data: list[DocumentOut]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: str = "list"


class SearchRequest(msgspec.Struct, forbid_unknown_fields=True):
    query: Query
    top_k: TopK = 5
    filter: FilterSpec | None = None
    min_score: float | None = None
    # Left out: the collection's search defaults, then the service's (dense, RAG_HYBRID_*).
    mode: SearchMode | None = None
    alpha: Alpha | None = None
    fusion: Fusion | None = None
    # Rerank the candidates with the cross-encoder (RAG_RERANKER_MODEL); score = its score.
    rerank: bool | None = None
    rerank_depth: RerankDepth | None = None
    debug: bool = False


class SearchResult(msgspec.Struct, omit_defaults=True):
    document_id: str
    chunk_id: int
    text: str
    score: float
    metadata: dict[str, Any]
    position: int
    start: int
    end: int
    # Where the chunk sits (rag_service.locations), when the document's layout says: the page
    # it starts on, the page it ends on when that is a later one, its section heading.
    page: int | None = None
    page_end: int | None = None
    section: str | None = None
    # With ``debug``: the scores the result's score was made of (dense, bm25, fused, ...).
    scores: dict[str, float] | None = None
    # With ``debug``: "question" when a known question of the document ranked it (its score
    # is the question's; ``scores`` holds ``question`` and the chunk's own ``chunk``), else
    # "chunk".
    matched: Literal["chunk", "question"] | None = None


class SearchResponse(msgspec.Struct, omit_defaults=True):
    results: list[SearchResult]
    object: str = "search.result"
    timings_ms: dict[str, float] | None = None


class EmbeddingsRequest(msgspec.Struct):
    """OpenAI embeddings request. Unknown fields are ignored, as OpenAI clients send extras."""

    # Token-id arrays (what OpenAI's API also takes, and what LangChain's OpenAIEmbeddings sends
    # by default) are read only to be refused with a message saying what to send instead.
    input: (
        InputText
        | Annotated[list[InputText | int | list[int]], msgspec.Meta(min_length=1, max_length=2048)]
    )
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingData(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class Usage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(msgspec.Struct):
    data: list[EmbeddingData]
    model: str
    usage: Usage
    object: str = "list"
