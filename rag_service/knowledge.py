"""Knowledge operations: validate -> chunk -> embed -> hand to the storage engine.

The service owns what needs the models and the settings (validation, chunking, embedding,
the query's vector); the engine's live collection owns consistency (one transaction per
upsert, its index, its locks). Either engine (``embedded``: SQLite + FAISS, ``postgres``:
PostgreSQL + pgvector) sits behind the same :class:`~indexes.engine.Engine` protocol.

Upsert: validate -> skip unchanged documents (content hash, asked of the collection) -> chunk
-> embed in batches (bulk lane) -> ``collection.upsert`` -> acknowledge. A collection is made
on first upsert, in the same transaction as the write.

Search: validate -> embed the query (interactive lane) -> ``collection.search`` -> with
``rerank``, score the candidates with the cross-encoder and keep the best top_k
(:mod:`rag_service.reranking`).

Each collection is embedded (chunks, questions, queries) with the model it records
(:mod:`rag_service.embedders`); new collections take the default model. Vectors travel to the
engine with their model's identifier: when a reindex swapped the collection to another model
meanwhile, the engine answers :class:`~indexes.reindex.ModelChanged` and the work is embedded
again with the new model (a search at once, an upsert as its stale-write retry).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from indexes.engine import Collection, CollectionGone, Engine, StaleWrite
from indexes.reindex import ModelChanged
from indexes.types import (
    Chunk,
    CollectionOptions,
    CollectionRow,
    DocumentRow,
    DocumentWrite,
    FilterError,
    MetadataFilter,
    ScoredHit,
    SearchQuery,
    canonical_json,
    content_hash,
)
from rag_service.batching import Lane, MicroBatcher
from rag_service.chunking import ChunkingConfig, chunk_offsets
from rag_service.embedders import EmbeddingModels, LoadedModel
from rag_service.embedding import Embedder, Text
from rag_service.errors import (
    CollectionNotFound,
    DocumentNotFound,
    IndexConfigError,
    InvalidRequest,
    PayloadTooLarge,
)
from rag_service.locations import check_layout, without_layout
from rag_service.metrics import Metrics
from rag_service.questions import unique_questions, upsert_questions
from rag_service.reranking import Reranker
from rag_service.schemas import DocumentIn, check_collection_name
from rag_service.settings import Settings

__all__ = ["KnowledgeBase", "UpsertOutcome"]


UPSERT_ATTEMPTS = 3
SEARCH_ATTEMPTS = 3  # a search embedded by a model a reindex just swapped out is redone


@dataclass(frozen=True, slots=True)
class UpsertOutcome:
    collection: str
    statuses: list[tuple[str, int, str]]  # (id, chunks, status)
    timings_ms: dict[str, float]


@dataclass(frozen=True, slots=True)
class RerankPlan:
    """A reranked search: the candidates retrieved, then what is kept of them."""

    depth: int  # candidates retrieved: max(rerank_depth, top_k)
    top_k: int
    min_score: float | None  # applies to the reranker's score
    scored: int = 0  # the first this many candidates are reranked; 0: all of them


class KnowledgeBase:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        embedder: Embedder,
        batcher: MicroBatcher,
        metrics: Metrics,
        *,
        reranker: Reranker | None = None,
        models: EmbeddingModels | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.embedder = embedder  # the default model's: new collections, /v1/embeddings
        self.batcher = batcher
        self.metrics = metrics
        self.reranker = reranker
        self.models = models or EmbeddingModels.serving(settings, embedder, batcher)
        self._searching = 0  # searches in progress, from the query's embedding on

    # ---- collections ---------------------------------------------------------------------
    async def collection(self, name: str, *, vectors: bool = False) -> Collection:
        """The live collection; with ``vectors``, also one this service can search and write
        (it can load the embedding model the collection records)."""
        found = await self.engine.lookup(name)
        if found is None:
            raise CollectionNotFound(f"collection {name!r} does not exist", param="collection")
        if vectors:
            await self.model_for(found.row)
        return found

    async def model_for(self, row: CollectionRow) -> LoadedModel:
        """The embedding model of a collection; EmbeddingMismatch (409) when this service
        cannot load it."""
        return await self.models.for_collection(row)

    def options(
        self,
        name: str,
        index: str = "Flat",
        chunk_tokens: int | None = None,
        chunk_overlap: int | None = None,
        search: dict[str, Any] | None = None,
    ) -> CollectionOptions:
        """Collection options, validated once; errors name the field."""
        check_collection_name(name)
        window = self.embedder.content_window
        tokens = (
            chunk_tokens if chunk_tokens is not None else min(self.settings.chunk_tokens, window)
        )
        if tokens > window:
            raise InvalidRequest(
                f"chunk_tokens {tokens} exceeds the embedding model's window of {window} tokens",
                param="chunk_tokens",
            )
        overlap = (
            chunk_overlap
            if chunk_overlap is not None
            else min(self.settings.chunk_overlap, tokens // 2)
        )
        try:
            ChunkingConfig(tokens, overlap)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="chunk_overlap") from exc
        try:
            self.engine.check_index(index, self.embedder.dimension)
        except ValueError as exc:
            raise IndexConfigError(str(exc), param="index") from exc
        self._check_rerank_defaults(search or {})
        return CollectionOptions(
            name=name,
            embedding_model=self.embedder.name,
            dimension=self.embedder.dimension,
            index=index,
            chunk_tokens=tokens,
            chunk_overlap=overlap,
            search=dict(search or {}),
        )

    async def create_collection(
        self,
        name: str,
        *,
        index: str = "Flat",
        chunk_tokens: int | None = None,
        chunk_overlap: int | None = None,
        search: dict[str, Any] | None = None,
    ) -> CollectionRow:
        options = self.options(name, index, chunk_tokens, chunk_overlap, search)
        collection = await self.engine.create(options)
        return collection.row

    async def configure_collection(self, name: str, search: dict[str, Any]) -> CollectionRow:
        """Replace the collection's search defaults (already validated by the wire type)."""
        self._check_rerank_defaults(search)
        await self.collection(name)
        try:
            return await self.engine.configure(name, search)
        except CollectionGone as exc:
            raise CollectionNotFound(
                f"collection {name!r} does not exist", param="collection"
            ) from exc

    async def list_collections(self) -> list[CollectionRow]:
        return await self.engine.list()

    async def delete_collection(self, name: str) -> None:
        await self.collection(name)
        await self.engine.drop(name)

    # ---- documents -----------------------------------------------------------------------
    def validate_documents(self, docs: Sequence[DocumentIn]) -> None:
        """:class:`InvalidRequest` naming ``documents[i].<field>`` for the first document the
        settings refuse (count, duplicate ids, text, metadata, layout, questions)."""
        s = self.settings
        if len(docs) > s.max_documents_per_request:
            raise InvalidRequest(
                f"at most {s.max_documents_per_request} documents per request, got {len(docs)}",
                param="documents",
            )
        seen: set[str] = set()
        for i, doc in enumerate(docs):
            if doc.id in seen:
                raise InvalidRequest(
                    f"document id {doc.id!r} appears twice in this batch",
                    param=f"documents[{i}].id",
                )
            seen.add(doc.id)
            if len(doc.text) > s.max_document_chars:
                raise InvalidRequest(
                    f"document text is {len(doc.text)} characters; the limit is "
                    f"{s.max_document_chars}",
                    param=f"documents[{i}].text",
                )
            if not doc.text.strip():
                raise InvalidRequest("document text is blank", param=f"documents[{i}].text")
            if "\x00" in doc.text:
                raise InvalidRequest(
                    "document text holds a NUL character (U+0000)", param=f"documents[{i}].text"
                )
            if _holds_nul(doc.metadata):
                raise InvalidRequest(
                    "metadata holds a NUL character (U+0000)", param=f"documents[{i}].metadata"
                )
            if len(canonical_json(without_layout(doc.metadata))) > 65536:
                raise InvalidRequest(
                    "metadata is larger than 64 KiB", param=f"documents[{i}].metadata"
                )
            check_layout(doc.metadata, len(doc.text), f"documents[{i}].metadata")
            if doc.questions is not None:
                unique_questions(doc.questions, f"documents[{i}].questions")

    async def upsert(self, name: str, docs: Sequence[DocumentIn]) -> UpsertOutcome:
        self.validate_documents(docs)
        for attempt in range(UPSERT_ATTEMPTS):
            try:
                return await self._upsert(name, docs, skip_unchanged=attempt < UPSERT_ATTEMPTS - 1)
            except (StaleWrite, CollectionGone):
                # Another upsert of the same id changed a text we meant to keep, or the
                # collection was dropped while we embedded: read and embed again. The last
                # attempt embeds every document, so it cannot go stale.
                if attempt == UPSERT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _upsert(
        self, name: str, docs: Sequence[DocumentIn], *, skip_unchanged: bool
    ) -> UpsertOutcome:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        collection = await self.engine.lookup(name)
        model = await self.model_for(collection.row) if collection else self.models.default
        options = self.options(name) if collection is None else None
        existing = await collection.existing([d.id for d in docs]) if collection else {}
        row = collection.row if collection is not None else None
        hashes = [content_hash(d.text) for d in docs]
        to_embed = [
            i
            for i, d in enumerate(docs)
            if not skip_unchanged or existing.get(d.id, ("",))[0] != hashes[i]
        ]
        cfg = (
            ChunkingConfig(row.chunk_tokens, row.chunk_overlap)
            if row is not None
            else ChunkingConfig(options.chunk_tokens, options.chunk_overlap)  # type: ignore[union-attr]
        )
        t = time.perf_counter()
        chunked = await asyncio.to_thread(
            self._chunk, [docs[i].text for i in to_embed], cfg, model.embedder
        )
        timings["chunk"] = _ms(t)
        flat_items = [item for _, items, _ in chunked for item in items]
        flat_tokens = [tok for _, _, toks in chunked for tok in toks]
        t = time.perf_counter()
        vectors = (
            await model.batcher.embed(flat_items, flat_tokens, lane="bulk")
            if flat_items
            else np.zeros((0, model.dimension), np.float32)
        )
        timings["embed"] = _ms(t)
        self.metrics.chunks_embedded.inc(len(flat_items))
        t = time.perf_counter()
        questions = await upsert_questions(
            self, collection, docs, skip_unchanged=skip_unchanged, model=model
        )
        if questions:
            timings["embed_questions"] = _ms(t)
        writes: list[DocumentWrite] = []
        chunk_by_doc = dict(zip(to_embed, chunked, strict=True))
        offset = 0
        for i, doc in enumerate(docs):
            chunks = None
            vecs = None
            if i in chunk_by_doc:
                chunks = chunk_by_doc[i][0]
                vecs = vectors[offset : offset + len(chunks)]
                offset += len(chunks)
            write = DocumentWrite(doc.id, doc.text, doc.metadata, hashes[i], chunks, vecs)
            if i in questions:  # known questions: extra keys of the document
                write.questions, write.question_vectors = questions[i]
            writes.append(write)
        t = time.perf_counter()
        if collection is None:
            assert options is not None
            collection, outcome = await self.engine.upsert_new(options, writes)
        else:
            outcome = await collection.upsert(writes, model=model.id)
        timings["write"] = _ms(t)
        statuses = []
        for doc in docs:
            status = outcome.statuses[doc.id]
            self.metrics.documents.labels(status).inc()
            statuses.append((doc.id, outcome.chunk_counts[doc.id], status))
        timings["total"] = _ms(t0)
        return UpsertOutcome(collection.row.name, statuses, timings)

    def _chunk(
        self, texts: list[str], cfg: ChunkingConfig, embedder: Embedder
    ) -> list[tuple[list[Chunk], list[Text], list[int]]]:
        """Chunks in ``embedder``'s tokens (the collection's model), what to encode for each
        (its token ids, cut from the document's where the model allows, else its text) and
        their token counts. Each document is tokenised once."""
        out = []
        for text, document in zip(texts, embedder.tokenize_documents(texts), strict=True):
            chunks = chunk_offsets(text, document.offsets, cfg)
            items: list[Text] = []
            for c in chunks:
                ids = embedder.chunk_ids(document, c.first, c.tokens)
                items.append(c.text if ids is None else ids)
            out.append(
                (
                    [Chunk(c.position, c.start, c.end, c.text) for c in chunks],
                    items,
                    [min(c.tokens + 2, embedder.max_seq_length) for c in chunks],
                )
            )
        return out

    async def get_document(self, name: str, doc_id: str) -> DocumentRow:
        doc = await (await self.collection(name)).get(doc_id)
        if doc is None:
            raise DocumentNotFound(
                f"document {doc_id!r} not found in collection {name!r}", param="id"
            )
        return doc

    async def list_documents(
        self, name: str, *, limit: int, after: str | None, prefix: str = ""
    ) -> tuple[list[DocumentRow], bool]:
        return await (await self.collection(name)).list(limit=limit, after=after, prefix=prefix)

    async def delete_document(self, name: str, doc_id: str) -> None:
        if not await (await self.collection(name)).delete(doc_id):
            raise DocumentNotFound(
                f"document {doc_id!r} not found in collection {name!r}", param="id"
            )

    # ---- search --------------------------------------------------------------------------
    async def embed_queries(
        self, texts: Sequence[str], model: LoadedModel | None = None
    ) -> tuple[np.ndarray, int]:
        """Vectors for an embeddings request (by ``model``, default: the default model), and
        the tokens it used.

        A request with more than ``interactive_max_texts`` inputs (or more tokens than one
        bulk batch) is encoded on the bulk lane, in bounded batches beside ingest, so a search
        waits behind at most one small batch of it. Past ``max_embedding_tokens`` it is
        refused (413) before anything is encoded.
        """
        s = self.settings
        model = model or self.models.default
        small = len(texts) <= s.interactive_max_texts
        if small:
            tokens = model.embedder.count_tokens(list(texts))
        else:  # tokenizing thousands of inputs would stall the event loop
            tokens = await asyncio.to_thread(model.embedder.count_tokens, list(texts))
        total = sum(tokens)
        if total > s.max_embedding_tokens:
            raise PayloadTooLarge(
                f"the input holds {total} tokens; one request may hold at most "
                f"{s.max_embedding_tokens} (RAG_MAX_EMBEDDING_TOKENS): split it",
                param="input",
            )
        lane: Lane = "interactive" if small and total <= s.max_bulk_tokens else "bulk"
        vectors = await model.batcher.embed(texts, tokens, lane=lane)
        return vectors, total

    async def search(
        self,
        name: str,
        query: str,
        *,
        top_k: int = 5,
        filter: dict[str, Any] | None = None,
        min_score: float | None = None,
        mode: str | None = None,
        alpha: float | None = None,
        fusion: str | None = None,
        rerank: bool | None = None,
        rerank_depth: int | None = None,
        keep_unreranked: bool = False,
    ) -> tuple[list[ScoredHit], dict[str, float]]:
        """Top-k chunks for ``query``. ``mode``, ``alpha``, ``fusion``, ``rerank`` and
        ``rerank_depth`` left as None take the collection's search defaults, then the
        service's settings.

        A reranked search scores ``max(rerank_depth, top_k)`` candidates. With
        ``keep_unreranked`` (the evaluate endpoint's ranking) only the first ``rerank_depth``
        are reranked, and the rest of the ``top_k`` follow them in retrieval order, with their
        retrieval scores (``min_score`` then applies to the reranked ones only)."""
        if top_k > self.settings.max_top_k:
            raise InvalidRequest(f"top_k must be at most {self.settings.max_top_k}", param="top_k")
        if len(query) > self.settings.max_query_chars:
            raise InvalidRequest(
                f"query is longer than {self.settings.max_query_chars} characters", param="query"
            )
        if not query.strip():
            raise InvalidRequest("query is blank", param="query")
        try:
            flt = MetadataFilter.parse(filter)
        except FilterError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from exc
        self._check_rerank_depth(rerank_depth, "rerank_depth")
        collection = await self.collection(name, vectors=True)
        defaults = collection.row.search
        plan = self._rerank_plan(
            defaults, rerank, rerank_depth, top_k, min_score, keep_unreranked=keep_unreranked
        )
        request = SearchQuery(
            text=query,
            vector=np.zeros((1, 0), np.float32),  # filled in once the query is embedded
            top_k=top_k if plan is None else plan.depth,
            filter=flt,
            min_score=min_score if plan is None else None,
            mode="hybrid" if (mode or defaults.get("mode")) == "hybrid" else "dense",
            alpha=_first(alpha, defaults.get("alpha"), self.settings.hybrid_alpha),
            fusion="rrf"
            if _first(fusion, defaults.get("fusion"), self.settings.hybrid_fusion) == "rrf"
            else "convex",
        )
        self._searching += 1
        try:
            return await self._search(collection, request, plan)
        finally:
            self._searching -= 1

    async def _search(
        self, collection: Collection, request: SearchQuery, plan: RerankPlan | None = None
    ) -> tuple[list[ScoredHit], dict[str, float]]:
        query = request.text
        t0 = time.perf_counter()
        for attempt in range(SEARCH_ATTEMPTS):
            model = await self.model_for(collection.row)
            vector = await model.embed_query(query)
            timings = {"embed": _ms(t0)}
            request = replace(
                request, vector=vector, alone=self._searching == 1, embedding_model=model.id
            )
            try:
                hits = await collection.search(request, timings)
                break
            except ModelChanged:  # a reindex swapped meanwhile: embed with the new model
                if attempt == SEARCH_ATTEMPTS - 1:
                    raise
        if plan is not None:
            hits = await self._rerank(query, hits, plan, timings)
        timings["total"] = _ms(t0)
        label = request.mode if plan is None else f"{request.mode}+rerank"
        self.metrics.search_latency.labels(label).observe(timings["total"] / 1000)
        return hits, timings

    # ---- reranking -----------------------------------------------------------------------
    def _check_rerank_depth(self, depth: int | None, param: str) -> None:
        bound = self.settings.max_rerank_depth
        if depth is not None and depth > bound:
            raise InvalidRequest(
                f"{param} must be at most {bound} (RAG_MAX_RERANK_DEPTH), got {depth}",
                param=param,
            )

    def _require_reranker(self, param: str, why: str = "rerank is true") -> None:
        if self.reranker is None:
            raise InvalidRequest(
                f"{why} but no reranker is configured: set RAG_RERANKER_MODEL to a "
                "cross-encoder directory",
                param=param,
            )

    def _check_rerank_defaults(self, search: dict[str, Any]) -> None:
        """A collection may default to reranking only where a reranker is configured."""
        if search.get("rerank"):
            self._require_reranker("search.rerank", "search.rerank is true")
        self._check_rerank_depth(search.get("rerank_depth"), "search.rerank_depth")

    def _rerank_plan(
        self,
        defaults: dict[str, Any],
        rerank: bool | None,
        rerank_depth: int | None,
        top_k: int,
        min_score: float | None,
        *,
        keep_unreranked: bool = False,
    ) -> RerankPlan | None:
        """None for a plain search; else how many candidates to rerank and what to keep."""
        if rerank is None and defaults.get("rerank"):
            # The collection says rerank; a service started without a reranker cannot.
            self._require_reranker("rerank", "the collection's search defaults say rerank: true")
        if not _first(rerank, defaults.get("rerank"), False):
            return None
        self._require_reranker("rerank")
        depth = _first(rerank_depth, defaults.get("rerank_depth"), self.settings.rerank_depth)
        self._check_rerank_depth(depth, "rerank_depth")
        return RerankPlan(max(depth, top_k), top_k, min_score, depth if keep_unreranked else 0)

    async def _rerank(
        self, query: str, hits: list[ScoredHit], plan: RerankPlan, timings: dict[str, float]
    ) -> list[ScoredHit]:
        """The candidates ordered by the reranker's score (ties keep the retrieval order),
        ``min_score`` applied to it, the first ``top_k`` kept. ``parts`` keeps the retrieval
        parts and adds ``retrieval`` (the score before reranking) and ``rerank``. Candidates
        past ``plan.scored`` (when set) are not reranked: they follow, in retrieval order."""
        assert self.reranker is not None
        head = hits[: plan.scored] if plan.scored else hits
        t = time.perf_counter()
        scores = await self.reranker.score(query, [h.hit.text for h in head])
        timings["rerank"] = _ms(t)
        reranked = [
            ScoredHit(h.hit, s, {**h.parts, "retrieval": h.score, "rerank": s})
            for h, s in zip(head, map(float, scores), strict=True)
        ]
        reranked.sort(key=lambda h: -h.score)
        if plan.min_score is not None:
            reranked = [h for h in reranked if h.score >= plan.min_score]
        rest = [
            ScoredHit(h.hit, h.score, {**h.parts, "retrieval": h.score}) for h in hits[len(head) :]
        ]
        return (reranked + rest)[: plan.top_k]


def _first(*values: Any) -> Any:
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def _holds_nul(value: Any) -> bool:
    """True if any key or string in a JSON value holds U+0000 (no store keeps it intact)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
