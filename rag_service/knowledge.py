"""Knowledge operations: collections, document upsert/delete, search, embeddings.

Upsert data flow: validate -> skip unchanged documents (content hash) -> chunk -> embed in
batches (bulk lane) -> one SQLite transaction (old chunks out, new in) -> under the
collection's write lock: commit, then apply the delta to the index -> acknowledge. Upserts into
one collection are serialised (``CollectionRuntime.writer``); a failed batch writes nothing.

Search: embed the query (interactive lane) -> under the read lock: metadata filter -> FAISS
top-k restricted to the allowed ids (and BM25 for hybrid) -> rows from the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexes.docstore import (
    CollectionRow,
    DocumentRow,
    DocumentStore,
    DocumentWrite,
    Filter,
    FilterError,
    Hit,
    canonical_json,
    content_hash,
)
from indexes.faiss_index import FaissIndex, validate_factory
from rag_service.batching import Lane, MicroBatcher
from rag_service.chunking import ChunkingConfig, chunk_offsets
from rag_service.embedding import Embedder
from rag_service.errors import (
    CollectionExists,
    DocumentNotFound,
    IndexConfigError,
    InvalidRequest,
    PayloadTooLarge,
)
from rag_service.metrics import Metrics
from rag_service.registry import CollectionRuntime, Registry
from rag_service.schemas import DocumentIn, check_collection_name
from rag_service.settings import Settings

__all__ = ["KnowledgeBase", "ScoredHit", "UpsertOutcome"]

RRF_K = 60


@dataclass(frozen=True, slots=True)
class ScoredHit:
    hit: Hit
    score: float


@dataclass(frozen=True, slots=True)
class UpsertOutcome:
    collection: str
    statuses: list[tuple[str, int, str]]  # (id, chunks, status)
    timings_ms: dict[str, float]


class KnowledgeBase:
    def __init__(
        self,
        settings: Settings,
        store: DocumentStore,
        embedder: Embedder,
        batcher: MicroBatcher,
        registry: Registry,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.batcher = batcher
        self.registry = registry
        self.metrics = metrics
        # One thread applies writes: SQLite has one writer, and this keeps commits ordered.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._searching = 0  # searches in progress

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    async def _write(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    # ---- collections ---------------------------------------------------------------------
    def _collection_options(
        self,
        name: str,
        index: str = "Flat",
        chunk_tokens: int | None = None,
        chunk_overlap: int | None = None,
    ) -> dict[str, Any]:
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
            validate_factory(index, self.embedder.dimension, max_nlist=self.settings.max_ivf_nlist)
        except ValueError as exc:
            raise IndexConfigError(str(exc), param="index") from exc
        return {
            "name": name,
            "embedding_model": self.embedder.name,
            "dimension": self.embedder.dimension,
            "index_factory": index,
            "chunk_tokens": tokens,
            "chunk_overlap": overlap,
        }

    async def create_collection(
        self,
        name: str,
        *,
        index: str = "Flat",
        chunk_tokens: int | None = None,
        chunk_overlap: int | None = None,
    ) -> CollectionRow:
        options = self._collection_options(name, index, chunk_tokens, chunk_overlap)
        async with self.registry.creation_lock:
            if self.registry.find(name) is not None:
                raise CollectionExists(f"collection {name!r} already exists", param="name")
            # Built once, off the event loop, before anything is written: a factory FAISS
            # refuses leaves no row behind.
            built = await asyncio.to_thread(self._build_index, options)
            row = await self._write(lambda: self.store.create_collection(**options))
            if row is None:
                raise CollectionExists(f"collection {name!r} already exists", param="name")
            self.registry.register(row, built)
            return row

    def _build_index(self, options: dict[str, Any]) -> FaissIndex:
        try:
            return self.registry.new_index(_row_from(options))
        except RuntimeError as exc:  # FAISS's own refusal, past the grammar check
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
            raise IndexConfigError(
                f"FAISS cannot build index {options['index_factory']!r}: {first}", param="index"
            ) from exc

    def list_collections(self) -> list[CollectionRow]:
        return self.store.list_collections()

    async def delete_collection(self, name: str) -> None:
        rt = self.registry.get(name)
        async with rt.writer:
            await self._write(self.store.delete_collection, rt.row.id)
            with rt.lock.write():
                self.registry.unregister(name)

    # ---- documents -----------------------------------------------------------------------
    def _validate_documents(self, docs: Sequence[DocumentIn]) -> None:
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
            if len(canonical_json(doc.metadata)) > 65536:
                raise InvalidRequest(
                    "metadata is larger than 64 KiB", param=f"documents[{i}].metadata"
                )

    async def upsert(self, name: str, docs: Sequence[DocumentIn]) -> UpsertOutcome:
        self._validate_documents(docs)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        rt = self.registry.find(name)
        create: dict[str, Any] | None = None
        if rt is None:
            create = self._collection_options(name)
            async with self.registry.creation_lock:
                rt = self.registry.find(name)
                if rt is None:
                    return await self._upsert_locked(None, create, docs, timings, t0)
        rt.usable_index()
        async with rt.writer:
            if self.registry.find(name) is not rt:  # dropped while we waited
                return await self.upsert(name, docs)
            return await self._upsert_locked(rt, None, docs, timings, t0)

    async def _upsert_locked(
        self,
        rt: CollectionRuntime | None,
        create: dict[str, Any] | None,
        docs: Sequence[DocumentIn],
        timings: dict[str, float],
        t0: float,
    ) -> UpsertOutcome:
        row = rt.row if rt is not None else None
        existing = (
            await asyncio.to_thread(self.store.existing, row.id, [d.id for d in docs])
            if row is not None
            else {}
        )
        hashes = [content_hash(d.text) for d in docs]
        to_embed = [i for i, d in enumerate(docs) if existing.get(d.id, ("",))[0] != hashes[i]]
        cfg = ChunkingConfig(
            row.chunk_tokens if row else create["chunk_tokens"],  # type: ignore[index]
            row.chunk_overlap if row else create["chunk_overlap"],  # type: ignore[index]
        )
        t = time.perf_counter()
        chunked = await asyncio.to_thread(self._chunk, [docs[i].text for i in to_embed], cfg)
        timings["chunk"] = _ms(t)
        flat_texts = [c[3] for chunks, _ in chunked for c in chunks]
        flat_tokens = [tok for _, toks in chunked for tok in toks]
        t = time.perf_counter()
        vectors = (
            await self.batcher.embed(flat_texts, flat_tokens, lane="bulk")
            if flat_texts
            else np.zeros((0, self.embedder.dimension), np.float32)
        )
        timings["embed"] = _ms(t)
        self.metrics.chunks_embedded.inc(len(flat_texts))
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
            writes.append(DocumentWrite(doc.id, doc.text, doc.metadata, hashes[i], chunks, vecs))
        t = time.perf_counter()
        new_index = (
            await asyncio.to_thread(self._build_index, create) if create is not None else None
        )

        def apply() -> tuple[Any, CollectionRow]:
            staged, collection_row = self.store.stage_upsert(row, create, writes)
            index = rt.index if rt is not None else new_index
            assert index is not None
            if rt is None:
                staged.commit()
                index.remove(np.asarray(staged.removed, np.int64))
                index.add(np.asarray(staged.added_ids, np.int64), staged.vectors)
                return staged, collection_row
            try:
                with rt.lock.write():
                    staged.commit()
                    index.remove(np.asarray(staged.removed, np.int64))
                    if staged.added_ids:
                        index.add(np.asarray(staged.added_ids, np.int64), staged.vectors)
            except BaseException:
                staged.rollback()
                raise
            return staged, collection_row

        staged, collection_row = await self._write(apply)
        timings["write"] = _ms(t)
        if rt is None:
            assert new_index is not None
            rt = self.registry.register(collection_row, new_index)
        rt.dirty = True
        rt.version += 1
        self.metrics.index_vectors.labels(rt.row.name).set(len(rt.index or ()))
        statuses = []
        for doc in docs:
            status = staged.statuses[doc.id]
            self.metrics.documents.labels(status).inc()
            statuses.append((doc.id, staged.chunk_counts[doc.id], status))
        timings["total"] = _ms(t0)
        return UpsertOutcome(rt.row.name, statuses, timings)

    def _chunk(
        self, texts: list[str], cfg: ChunkingConfig
    ) -> list[tuple[list[tuple[int, int, int, str]], list[int]]]:
        out = []
        for text, offsets in zip(texts, self.embedder.offsets(texts), strict=True):
            chunks = chunk_offsets(text, offsets, cfg)
            out.append(
                (
                    [(c.position, c.start, c.end, c.text) for c in chunks],
                    [min(c.tokens + 2, self.embedder.max_seq_length) for c in chunks],
                )
            )
        return out

    def get_document(self, name: str, doc_id: str) -> DocumentRow:
        rt = self.registry.get(name)
        doc = self.store.get_document(rt.row.id, doc_id)
        if doc is None:
            raise DocumentNotFound(
                f"document {doc_id!r} not found in collection {name!r}", param="id"
            )
        return doc

    def list_documents(
        self, name: str, *, limit: int, after: str | None
    ) -> tuple[list[DocumentRow], bool]:
        rt = self.registry.get(name)
        return self.store.list_documents(rt.row.id, limit=limit, after=after)

    async def delete_document(self, name: str, doc_id: str) -> None:
        rt = self.registry.get(name)
        rt.usable_index()
        async with rt.writer:
            index = rt.usable_index()

            def apply() -> bool:
                staged = self.store.stage_delete(rt.row.id, doc_id)
                if staged is None:
                    return False
                try:
                    with rt.lock.write():
                        staged.commit()
                        index.remove(np.asarray(staged.removed, np.int64))
                except BaseException:
                    staged.rollback()
                    raise
                return True

            if not await self._write(apply):
                raise DocumentNotFound(
                    f"document {doc_id!r} not found in collection {name!r}", param="id"
                )
            rt.dirty = True
            rt.version += 1
            self.metrics.index_vectors.labels(name).set(len(index))

    # ---- search --------------------------------------------------------------------------
    async def embed_queries(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Vectors for an embeddings request, and the tokens it used.

        A request with more than ``interactive_max_texts`` inputs (or more tokens than one
        bulk batch) is encoded on the bulk lane, in bounded batches beside ingest, so a search
        waits behind at most one small batch of it. Past ``max_embedding_tokens`` it is
        refused (413) before anything is encoded.
        """
        s = self.settings
        small = len(texts) <= s.interactive_max_texts
        if small:
            tokens = self.embedder.count_tokens(list(texts))
        else:  # tokenizing thousands of inputs would stall the event loop
            tokens = await asyncio.to_thread(self.embedder.count_tokens, list(texts))
        total = sum(tokens)
        if total > s.max_embedding_tokens:
            raise PayloadTooLarge(
                f"the input holds {total} tokens; one request may hold at most "
                f"{s.max_embedding_tokens} (RAG_MAX_EMBEDDING_TOKENS): split it",
                param="input",
            )
        lane: Lane = "interactive" if small and total <= s.max_bulk_tokens else "bulk"
        vectors = await self.batcher.embed(texts, tokens, lane=lane)
        return vectors, total

    async def search(
        self,
        name: str,
        query: str,
        *,
        top_k: int = 5,
        filter: dict[str, Any] | None = None,
        min_score: float | None = None,
        mode: str = "dense",
    ) -> tuple[list[ScoredHit], dict[str, float]]:
        if top_k > self.settings.max_top_k:
            raise InvalidRequest(f"top_k must be at most {self.settings.max_top_k}", param="top_k")
        if len(query) > self.settings.max_query_chars:
            raise InvalidRequest(
                f"query is longer than {self.settings.max_query_chars} characters", param="query"
            )
        if not query.strip():
            raise InvalidRequest("query is blank", param="query")
        try:
            flt = Filter.parse(filter)
        except FilterError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from exc
        rt = self.registry.get(name)
        rt.usable_index()
        self._searching += 1
        try:
            return await self._search(rt, query, top_k, flt, min_score, mode)
        finally:
            self._searching -= 1

    async def _search(
        self,
        rt: CollectionRuntime,
        query: str,
        top_k: int,
        flt: Filter | None,
        min_score: float | None,
        mode: str,
    ) -> tuple[list[ScoredHit], dict[str, float]]:
        t0 = time.perf_counter()
        # The query's token count only steers batching, so an estimate saves a tokenizer
        # pass on the event loop; the encoder tokenizes the query anyway.
        vectors = await self.batcher.embed(
            [query], [self.embedder.estimate_tokens(query)], lane="interactive"
        )
        timings = {"embed": _ms(t0)}
        args = (rt, vectors, query, top_k, flt, min_score, mode, timings)
        # Alone, a small search is cheaper on the loop than two thread hand-offs. Searches
        # that run at the same time go to threads: their queries come back from the encoder
        # in one batch, and searched inline they would add up to one long stall of the loop.
        hits = self._search_inline(*args) if self._searching == 1 else None
        if hits is None:
            hits = await asyncio.to_thread(self._search_blocking, *args)
        timings["total"] = _ms(t0)
        self.metrics.search_latency.labels(mode).observe(timings["total"] / 1000)
        return hits, timings

    def _search_inline(
        self,
        rt: CollectionRuntime,
        vectors: np.ndarray,
        query: str,
        top_k: int,
        flt: Filter | None,
        min_score: float | None,
        mode: str,
        timings: dict[str, float],
    ) -> list[ScoredHit] | None:
        """The search on the event loop when it is sure to be short (dense, unfiltered, a
        small index, no writer holding or waiting for the collection); None: use a thread."""
        limit = self.settings.inline_search_max_vectors
        if mode != "dense" or flt is not None or limit == 0:
            return None
        with rt.lock.read_nowait() as acquired:
            if not acquired or len(rt.usable_index()) > limit:
                return None
            return self._search_locked(rt, vectors, query, top_k, flt, min_score, mode, timings)

    def _search_blocking(
        self,
        rt: CollectionRuntime,
        vectors: np.ndarray,
        query: str,
        top_k: int,
        flt: Filter | None,
        min_score: float | None,
        mode: str,
        timings: dict[str, float],
    ) -> list[ScoredHit]:
        with rt.lock.read():
            return self._search_locked(rt, vectors, query, top_k, flt, min_score, mode, timings)

    def _search_locked(
        self,
        rt: CollectionRuntime,
        vectors: np.ndarray,
        query: str,
        top_k: int,
        flt: Filter | None,
        min_score: float | None,
        mode: str,
        timings: dict[str, float],
    ) -> list[ScoredHit]:
        """Dense (or hybrid) ranking plus the chunk rows; the caller holds the read lock."""
        index = rt.usable_index()
        allowed = None
        if flt is not None:
            t = time.perf_counter()
            allowed = self.store.filtered_chunk_ids(rt.row.id, flt)
            timings["filter"] = _ms(t)
            if len(allowed) == 0:
                return []
        depth = top_k if mode == "dense" else max(top_k * 4, 50)
        t = time.perf_counter()
        scores, ids = index.search(vectors, depth, allowed)
        timings["dense"] = _ms(t)
        dense = [
            (int(i), float(s))
            for s, i in zip(scores[0], ids[0], strict=True)
            if i >= 0 and (min_score is None or s >= min_score)
        ]
        if mode == "hybrid":
            t = time.perf_counter()
            sparse = self.store.bm25(rt.row.id, query, depth, flt)
            timings["bm25"] = _ms(t)
            ranked = _rrf([dense, sparse])[:top_k]
        else:
            ranked = dense[:top_k]
        t = time.perf_counter()
        rows = self.store.hydrate([cid for cid, _ in ranked])
        timings["hydrate"] = _ms(t)
        return [ScoredHit(rows[cid], score) for cid, score in ranked if cid in rows]


def _rrf(rankings: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(id) = sum over rankings of 1 / (RRF_K + rank)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (cid, _) in enumerate(ranking, start=1):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda kv: kv[1], reverse=True)


def _row_from(create: dict[str, Any]) -> CollectionRow:
    return CollectionRow(
        0,
        create["name"],
        create["embedding_model"],
        create["dimension"],
        create["index_factory"],
        create["chunk_tokens"],
        create["chunk_overlap"],
        0,
        0,
        0.0,
    )


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
