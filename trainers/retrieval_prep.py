"""Everything before training a retriever: pairs, passages, the split, mined negatives, ranks.

1. Pairs (:mod:`trainers.retrieval_data`) and the corpus are read first, so a bad line fails
   the run before any model loads. The corpus is cut into the passages the service would
   index (same chunker, same token windows); chat answers are passages of their own. With
   pseudo-queries from headings, heading lines are taken out of the passages, or a heading
   would find its section by its own words.
2. A labelled question names documents, not passages: its positive is the passage that holds
   its answer text, else the passage of its documents the base model ranks highest.
3. A seeded validation split is held out: by document (default; pairs that share a document
   stay together, and no validation document is seen in training, neither as a positive nor
   as a negative) or by query.
4. Hard negatives are mined with the base dense model: for each training query, the
   best-ranked passages of other training documents among the top ``--mine-top``. A
   candidate scoring above ``(1 - margin) x`` the positive's score is skipped: at the very top
   of the list sit unlabelled positives and near-duplicates of the positive, and training
   against them teaches the model to push right answers away (positive-aware mining, as in
   NV-Retriever; margin 0.05 by default). Exact-duplicate texts are skipped too.

Rankings are of documents, each at the rank of its best passage, scored with
:mod:`rag_service.evaluation` (recall@k, MRR@10, nDCG@10), as the evaluate endpoint does.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rag_service.evaluation import documents_in_order, normalise, score_rankings
from trainers.retrieval_config import RetrieverConfig
from trainers.retrieval_data import (
    DataError,
    Document,
    OffsetsFn,
    Pair,
    Passage,
    chat_pairs,
    chunk_documents,
    fetch_collection,
    heading_pairs,
    qa_pairs,
    read_corpus_file,
    write_questions,
)
from trainers.sft import TrainingError, _sha256

__all__ = [
    "METRICS",
    "RANK_DEPTH",
    "Prepared",
    "Sources",
    "by_source",
    "dense_rankings",
    "device",
    "encode",
    "load_embedder",
    "prepare",
    "read_sources",
    "resolve_model",
    "scores_of",
    "selection_key",
    "split_pairs",
    "top_indices",
]

log = logging.getLogger(__name__)

METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
RANK_DEPTH = 100  # passages looked at to rank the first 10 documents


@dataclass
class Prepared:
    train: list[Pair]
    val: list[Pair]
    pool: list[Passage]
    pool_emb: np.ndarray  # base model, normalised
    negatives: list[list[int]]  # per training pair, pool indices
    counts: dict[str, Any]
    corpus_record: dict[str, Any]


# --- helpers -----------------------------------------------------------------------------


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model(path: str) -> str:
    from rag_service.settings import bundled_embedding_model

    if not path:
        return bundled_embedding_model()
    if not (Path(path) / "config.json").exists():
        raise TrainingError(f"{path!r} is not a model directory (no config.json)")
    return path


def load_embedder(path: str, max_length: int) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(path, device=device())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load embedding model {path}: {exc}") from exc
    model.max_seq_length = min(max_length, int(model.max_seq_length or max_length))
    return model


def offsets_fn(model: Any) -> OffsetsFn:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()

    def offsets(texts: list[str]) -> list[list[tuple[int, int]]]:
        return [list(e.offsets) for e in tok.encode_batch(texts, add_special_tokens=False)]

    return offsets


def encode(model: Any, texts: Sequence[str]) -> np.ndarray:
    was_training = model.training
    model.eval()
    emb = model.encode(
        list(texts),
        batch_size=64,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    model.train(was_training)
    return np.asarray(emb, dtype=np.float32)


def top_indices(query_emb: np.ndarray, pool_emb: np.ndarray, k: int) -> np.ndarray:
    """For each query, the ``k`` best passages by inner product, best first (in blocks of
    queries, so a large pool never needs a queries x passages matrix at once)."""
    k = min(k, len(pool_emb))
    out = []
    for lo in range(0, len(query_emb), 512):
        scores = query_emb[lo : lo + 512] @ pool_emb.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, axis=1).argsort(axis=1, kind="stable")[:, ::-1]
        out.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def scores_of(rankings: Sequence[Sequence[str]], pairs: Sequence[Pair]) -> dict[str, Any]:
    s = score_rankings(rankings, [p.relevant for p in pairs])
    values = (s.recall_at_1, s.recall_at_5, s.recall_at_10, s.mrr_at_10, s.ndcg_at_10)
    return {
        "questions": s.questions,
        **{m: round(v, 4) for m, v in zip(METRICS, values, strict=True)},
    }


def selection_key(scores: dict[str, Any]) -> tuple[float, float]:
    return (scores["mrr@10"], scores["recall@1"])


def by_source(rankings: list[list[str]], pairs: list[Pair]) -> dict[str, Any]:
    sources = sorted({p.source for p in pairs})
    if len(sources) < 2:
        return {}
    return {
        s: scores_of(
            [r for r, p in zip(rankings, pairs, strict=True) if p.source == s],
            [p for p in pairs if p.source == s],
        )
        for s in sources
    }


def dense_rankings(query_emb: np.ndarray, pool_emb: np.ndarray, pool: Sequence[Passage]) -> list:
    """Documents in the order of their best passage, per query."""
    top = top_indices(query_emb, pool_emb, RANK_DEPTH)
    return [documents_in_order(pool[j].document_id for j in row) for row in top]


# --- data --------------------------------------------------------------------------------


def split_pairs(
    pairs: Sequence[Pair], *, fraction: float, seed: int, by: str
) -> tuple[list[Pair], list[Pair]]:
    """(train, val), seeded. By document: pairs that share a document fall on one side."""
    if by == "query":
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(pairs) * fraction))
        held = set(order[:n_val])
        return (
            [p for i, p in enumerate(pairs) if i not in held],
            [p for i, p in enumerate(pairs) if i in held],
        )
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        first, *rest = sorted(p.relevant)
        for other in rest:
            parent[find(other)] = find(first)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(find(min(p.relevant)), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    want = max(1, round(len(pairs) * fraction))
    val_idx: set[int] = set()
    for key in keys:
        if len(val_idx) >= want:
            break
        if len(val_idx) + len(groups[key]) > len(pairs) - 2:
            continue
        val_idx.update(groups[key])
    return (
        [p for i, p in enumerate(pairs) if i not in val_idx],
        [p for i, p in enumerate(pairs) if i in val_idx],
    )


@dataclass
class Sources:
    """What the files (or the collection) hold, read before any model is loaded."""

    corpus: list[Document]
    pairs: list[Pair]
    chat_answers: list[Document]
    counts: dict[str, Any]
    record: dict[str, Any]


def read_sources(cfg: RetrieverConfig, client: Any) -> Sources:
    corpus: list[Document] = []
    record: dict[str, Any] = {}
    if cfg.corpus is not None:
        corpus = read_corpus_file(cfg.corpus)
        record = {"file": str(cfg.corpus), "sha256": _sha256([cfg.corpus])}
    elif cfg.collection is not None:
        corpus = fetch_collection(client, cfg.collection)
        record = {"collection": cfg.collection, "url": str(client.base_url)}
    record["documents"] = len(corpus)
    counts: dict[str, Any] = {}
    pairs: list[Pair] = []
    if cfg.qa_file:
        pairs += qa_pairs(cfg.qa_file, corpus)
    answers: list[Document] = []
    if cfg.chat_file:
        found, answers = chat_pairs(cfg.chat_file)
        pairs += found
        counts["chat_answers"] = len(answers)
    if cfg.pseudo_queries:
        found, ambiguous = heading_pairs(corpus)
        pairs += found
        counts["headings_dropped_ambiguous"] = ambiguous
    return Sources(corpus, pairs, answers, counts, record)


def _positives(
    pairs: list[Pair], q_emb: np.ndarray, pool: list[Passage], pool_emb: np.ndarray
) -> list[Pair]:
    """Pairs with their positive set: the passage holding the answer, else the best-scoring
    passage of the relevant documents under the base model."""
    by_doc: dict[str, list[int]] = {}
    for j, p in enumerate(pool):
        by_doc.setdefault(p.document_id, []).append(j)
    out = []
    for i, pair in enumerate(pairs):
        if pair.positive is not None:
            out.append(pair)
            continue
        cands = [j for d in sorted(pair.relevant) for j in by_doc.get(d, [])]
        if not cands:
            raise DataError(f"{pair.origin}: its documents have no text to train on")
        if pair.answer is not None:
            needle = normalise(pair.answer)
            cands = [j for j in cands if needle in normalise(pool[j].text)] or cands
        best = max(cands, key=lambda j: float(pool_emb[j] @ q_emb[i]))
        out.append(replace(pair, positive=pool[best].text))
    return out


def _mine(
    cfg: RetrieverConfig,
    train: list[Pair],
    q_emb: np.ndarray,
    pos_emb: np.ndarray,
    pool: list[Passage],
    pool_emb: np.ndarray,
    excluded: set[str],
    *,
    fill: bool,
) -> tuple[list[list[int]], dict[str, Any]]:
    """Mined negatives (pool indices) per training pair; ``fill`` tops each up to
    ``--hard-negatives`` with random passages of other training documents."""
    k = cfg.hard_negatives
    allowed = [j for j, p in enumerate(pool) if p.document_id not in excluded]
    rng = random.Random(cfg.seed)
    out: list[list[int]] = []
    skipped = filled = 0
    if k == 0:
        return [[] for _ in train], {"per_query": 0.0}
    top = top_indices(q_emb, pool_emb, cfg.mine_top)
    for i, pair in enumerate(train):
        ceiling = (1 - cfg.negative_margin) * float(q_emb[i] @ pos_emb[i])
        positive = normalise(pair.positive or "")
        chosen: list[int] = []
        seen_text = {positive}
        for j in top[i]:
            p = pool[j]
            if p.document_id in pair.relevant or p.document_id in excluded:
                continue
            text = normalise(p.text)
            if float(q_emb[i] @ pool_emb[j]) > ceiling or text in seen_text:
                skipped += 1
                continue
            seen_text.add(text)
            chosen.append(int(j))
            if len(chosen) == k:
                break
        if fill and len(chosen) < k:
            others = [j for j in allowed if pool[j].document_id not in pair.relevant]
            others = [j for j in others if normalise(pool[j].text) not in seen_text]
            extra = rng.sample(others, min(k - len(chosen), len(others)))
            filled += len(extra)
            chosen += extra
        out.append(chosen)
    stats = {
        "per_query": round(sum(map(len, out)) / max(len(out), 1), 2),
        "skipped_above_margin": skipped,
        "random_fill": filled,
    }
    return out, stats


def prepare(
    cfg: RetrieverConfig, src: Sources, dense: Any, client: Any, progress: bool, *, fill: bool
) -> Prepared:
    """Passages, written questions, positives, the split and mined negatives."""
    offsets = offsets_fn(dense)
    tokens, overlap = min(cfg.chunk_tokens, int(dense.max_seq_length) - 2), cfg.chunk_overlap
    corpus_passages = chunk_documents(
        src.corpus, offsets, chunk_tokens=tokens, overlap=overlap, headings=not cfg.pseudo_queries
    )
    pool = corpus_passages + [Passage(d.id, d.text) for d in src.chat_answers]
    pairs, counts = list(src.pairs), dict(src.counts)
    if cfg.question_writer:
        raw = corpus_passages
        if cfg.pseudo_queries:  # the question writer reads passages with their headings
            raw = chunk_documents(src.corpus, offsets, chunk_tokens=tokens, overlap=overlap)
        found, refused = write_questions(
            client,
            raw,
            model=None if cfg.question_writer == "default" else cfg.question_writer,
            per_document=cfg.questions_per_document,
            seed=cfg.seed,
            progress=progress,
        )
        pairs += found
        counts["questions_written"] = len(found)
        counts["questions_refused"] = dict(refused)
        log.info("question writer: %d accepted, refused %s", len(found), dict(refused) or "none")
    if not pairs:
        raise DataError(f"no training pairs: the sources gave none ({counts})")
    counts["pairs_by_source"] = dict(Counter(p.source for p in pairs))
    log.info("%d pairs %s, %d passages", len(pairs), counts["pairs_by_source"], len(pool))
    pool_emb = encode(dense, [p.text for p in pool])
    q_emb = encode(dense, [p.query for p in pairs])
    pairs = _positives(pairs, q_emb, pool, pool_emb)
    train, val = split_pairs(pairs, fraction=cfg.val_fraction, seed=cfg.seed, by=cfg.split)
    if len(train) < 2 or len(val) < 2:
        raise DataError(
            f"too few pairs to hold out a validation split: {len(pairs)} pairs over "
            f"{len({d for p in pairs for d in p.relevant})} documents give {len(train)} to "
            f"train and {len(val)} to validate (--split {cfg.split}, --val-fraction "
            f"{cfg.val_fraction})"
        )
    if len(val) < 20:
        log.warning(
            "only %d validation questions: one question moves recall@1 by %.2f; the base vs "
            "trained figures are coarse",
            len(val),
            1 / len(val),
        )
    excluded = {d for p in val for d in p.relevant} if cfg.split == "document" else set()
    index = {id(p): i for i, p in enumerate(pairs)}
    t_emb = q_emb[[index[id(p)] for p in train]]
    pos_emb = encode(dense, [p.positive or "" for p in train])
    negatives, mining = _mine(cfg, train, t_emb, pos_emb, pool, pool_emb, excluded, fill=fill)
    counts.update(
        train_pairs=len(train),
        val_pairs=len(val),
        val_documents=len(excluded) if excluded else None,
        pool_passages=len(pool),
        hard_negatives=mining,
    )
    return Prepared(train, val, pool, pool_emb, negatives, counts, src.record)
