"""Cross-encoder reranking: a sentence-transformers ``CrossEncoder`` from a local directory.

A search with ``rerank`` (:meth:`~rag_service.knowledge.KnowledgeBase.search`) retrieves
``max(rerank_depth, top_k)`` candidates with its mode (dense or hybrid), scores every
(query, chunk text) pair with the cross-encoder, and returns the ``top_k`` best by that score.
The result's ``score`` is the reranker's; the retrieval score stays among the score parts
(``retrieval``, beside ``dense`` / ``bm25`` / ``fused``) that ``debug`` shows.

Scores are the sigmoid of the model's one logit, in (0, 1), whatever activation the model's
configuration names: sentence-transformers applies the one saved with the model (a reranker
trained and saved with ``Identity`` would give raw logits), so the sigmoid is passed
explicitly. The order is that of the logits (the sigmoid is monotonic); the fixed scale is
what lets ``min_score`` be used with a reranked search (it applies to this score).
Pairs longer than the model's window are cut from the longer side first (the chunk text, not
the query): the window is the tokenizer's ``model_max_length``, capped by the model's
position embeddings.

Batching. The pairs go through a second :class:`~rag_service.batching.MicroBatcher` whose
batch function scores pairs instead of embedding texts, and whose lanes run on the embedding
batcher's threads (``lanes``). So concurrent rerank requests merge into batches exactly as
queries do (same batching, queue bound and 503, cancellation), and a rerank pass and a query
embedding take turns on the one interactive thread instead of splitting the two cores between
two models' thread pools. The price: a query embedding that arrives during a rerank pass waits
for it, so passes are kept short (``RAG_RERANK_BATCH_TOKENS``; a deep rerank is scored in
several passes, with query embeddings slipping in between). A second instance was chosen over
one queue of mixed job types: the queueing code stays one piece of code, only the thread is
shared, and each kind keeps its own batch bounds and metrics.

Runtime. The cross-encoder runs on ``RAG_EMBEDDING_RUNTIME`` (auto: ONNX Runtime on CPU; the
per-lane measurement of the embedding models is not made for it, since it only ever runs on
the interactive lane): on CPU its scoring forward is exported to ONNX once
(:mod:`rag_service.onnx_encoder`) and serves only if it gives PyTorch's scores on probe pairs
(within ``MAX_SCORE_DIFF``); else PyTorch serves, with the reason logged. Both paths tokenise
with the library's own pair preprocessing, sorted by length and cut into passes of
``PASS_PAIRS`` as ``CrossEncoder.predict`` does.

The directory is checked before anything loads (:func:`check_reranker_dir`, also run by
:class:`~rag_service.settings.Settings`, so ``rag-service serve`` refuses a bad one at once):
a bi-encoder directory is refused rather than loaded, since ``CrossEncoder`` would otherwise
turn it into a cross-encoder with an untrained, random classification head.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rag_service import onnx_encoder
from rag_service.batching import MicroBatcher, Threads, available_cores, lane_shares
from rag_service.embedding import PROBE_TEXTS, Text, resolve_device
from rag_service.onnx_encoder import OnnxGraph, Unsupported
from rag_service.settings import SettingsError

if TYPE_CHECKING:
    from rag_service.metrics import Metrics
    from rag_service.settings import Settings

__all__ = ["Reranker", "check_reranker_dir", "open_reranker"]

log = logging.getLogger(__name__)

SETTING = "RAG_RERANKER_MODEL"
Pair = tuple[str, str]
# Pairs per forward pass inside one micro-batch (predict sorts them by length first).
PASS_PAIRS = 16


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{SETTING}: {path} is not readable JSON: {exc}") from exc
    return value if isinstance(value, dict) else None


def check_reranker_dir(path: str) -> None:
    """Raise :class:`SettingsError` (naming ``RAG_RERANKER_MODEL``) unless ``path`` looks like
    a local cross-encoder directory: a ``*ForSequenceClassification`` model with one output,
    not a sentence-embedding (bi-encoder) model. Reads only the JSON configuration."""
    root = Path(path)
    if not root.is_dir():
        raise SettingsError(
            f"{SETTING}: {path} is not a directory (a local cross-encoder model directory is "
            "needed; models are never downloaded)"
        )
    config = _read_json(root / "config.json")
    if config is None:
        raise SettingsError(f"{SETTING}: {path} holds no config.json, so it is not a model")
    st_config = _read_json(root / "config_sentence_transformers.json") or {}
    model_type = st_config.get("model_type")
    modules = root / "modules.json"
    pooled = modules.is_file() and "Pooling" in modules.read_text(encoding="utf-8")
    if (model_type is not None and model_type != "CrossEncoder") or (model_type is None and pooled):
        raise SettingsError(
            f"{SETTING}: {path} is a {model_type or 'SentenceTransformer'} (bi-encoder) model, "
            "not a cross-encoder; reranking needs a model that scores (query, text) pairs, "
            "e.g. cross-encoder/ms-marco-MiniLM-L-6-v2"
        )
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise SettingsError(
            f"{SETTING}: {path} is not a cross-encoder: its architecture is "
            f"{', '.join(map(str, architectures)) or 'not named'}, where a "
            "*ForSequenceClassification model with one output is needed"
        )
    labels = config.get("id2label")
    num_labels = len(labels) if isinstance(labels, dict) and labels else config.get("num_labels", 2)
    if num_labels != 1:
        raise SettingsError(
            f"{SETTING}: {path} has {num_labels} outputs (num_labels); a reranker needs a model "
            "with one relevance score"
        )


class Reranker:
    """The cross-encoder and the micro-batcher that feeds it (see the module docstring).

    Construction loads the model (blocking); :meth:`start` attaches the batcher to the
    embedding batcher's threads; :meth:`score` is what searches await.
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        runtime: str = "auto",
        cache_root: Path | None = None,
    ) -> None:
        check_reranker_dir(model_path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import CrossEncoder

        self.device = resolve_device(device)
        self.path = model_path
        self.name = Path(model_path).name or model_path
        kwargs: dict[str, Any] = {}
        if self.device == "cuda":
            kwargs["model_kwargs"] = {"torch_dtype": "float16"}
        try:
            self._model = CrossEncoder(
                model_path,
                device=self.device,
                local_files_only=True,
                activation_fn=torch.nn.Sigmoid(),  # not the saved one: see the module docstring
                **kwargs,
            )
        except (OSError, ValueError) as exc:
            raise SettingsError(
                f"{SETTING}: {model_path} could not be loaded as a cross-encoder: {exc}"
            ) from exc
        if self._model.num_labels != 1:
            raise SettingsError(
                f"{SETTING}: {model_path} has {self._model.num_labels} outputs (num_labels); "
                "a reranker needs a model with one relevance score"
            )
        self._model.eval()
        positions = getattr(self._model[0].config, "max_position_embeddings", None)
        window = self._model.max_seq_length
        if positions and (window is None or window > positions):
            window = int(positions)
            self._model.max_seq_length = window  # the tokenizer truncates to it
        if window is None:
            raise SettingsError(f"{SETTING}: {model_path} does not say how long an input may be")
        self.max_length: int = int(window)
        self._batcher: MicroBatcher[Pair] | None = None
        self._tokenize_lock = threading.Lock()
        self._graph: OnnxGraph | None = None
        self.runtime = "torch"
        self.probe_diff: float | None = None
        choice, self.runtime_note = onnx_encoder.resolve_runtime(runtime, self.device)
        if choice == "onnx":
            self._open_onnx(cache_root)
        log.info(
            "reranker %s (window %d tokens) on %s, runtime %s (%s)",
            self.name,
            self.max_length,
            self.device,
            self.runtime,
            self.runtime_note,
        )

    def _open_onnx(self, cache_root: Path | None) -> None:
        """Score on ONNX Runtime if the graph gives this model's scores on probe pairs."""
        pairs = [(q, t) for q in PROBE_TEXTS[:2] for t in PROBE_TEXTS]  # one pair truncated
        reference = self._predict_torch(pairs)

        def check(graph: OnnxGraph) -> str | None:
            diff = float(np.max(np.abs(self._predict_onnx(graph, pairs) - reference)))
            self.probe_diff = diff
            bar = onnx_encoder.MAX_SCORE_DIFF
            return None if diff <= bar else f"scores differ by {diff:.2e} > {bar}"

        started = time.perf_counter()
        cores = available_cores()
        threads = {cores, lane_shares(cores)["interactive"]}
        try:
            graph = onnx_encoder.load_graph(
                Path(self.path),
                "cross-encoder",
                check=check,
                cache_root=cache_root,
                threads=threads,
            )
        except Unsupported as exc:
            self.runtime_note = f"ONNX not used: {exc}"
            log.warning("reranker %s stays on PyTorch: %s", self.name, exc)
            return
        self._graph = graph
        self.runtime = "onnx"
        self.runtime_note = (
            f"probe score difference {self.probe_diff:.1e}, threads {graph.threads}, "
            f"ready in {time.perf_counter() - started:.1f} s"
        )

    # ---- blocking, on the batcher's thread -------------------------------------------
    def predict(
        self, pairs: list[Pair], tokens: list[int] | None = None, threads: Threads | None = None
    ) -> np.ndarray:
        """Sigmoid scores of ``pairs``, float32, in order. Blocking. ``tokens`` (each pair's
        estimated length) is the batch function's signature; predict sorts by length itself.
        ``threads`` (the lane's grant, asked before each pass) sizes ONNX Runtime's pool."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        if self._graph is not None:
            return self._predict_onnx(self._graph, pairs, threads)
        return self._predict_torch(pairs)

    def _predict_torch(self, pairs: list[Pair]) -> np.ndarray:
        scores = self._model.predict(
            pairs, batch_size=PASS_PAIRS, show_progress_bar=False, convert_to_numpy=True
        )
        return np.asarray(scores, dtype=np.float32).reshape(len(pairs))

    def _predict_onnx(
        self, graph: OnnxGraph, pairs: list[Pair], threads: Threads | None = None
    ) -> np.ndarray:
        import torch

        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out = np.empty(len(pairs), dtype=np.float32)
        for start in range(0, len(order), PASS_PAIRS):
            chunk = order[start : start + PASS_PAIRS]
            with self._tokenize_lock:
                features = self._model.preprocess([pairs[i] for i in chunk])
            arrays = {k: v.numpy() for k, v in features.items() if isinstance(v, torch.Tensor)}
            n = threads() if threads is not None else graph.threads[-1]
            logits = graph.run(arrays, n).reshape(len(chunk), -1)[:, 0].astype(np.float64)
            out[chunk] = 1.0 / (1.0 + np.exp(-logits))
        return out

    def estimate_tokens(self, query: str, text: str) -> int:
        """A cheap length of a pair (four characters a token, plus [CLS] and two [SEP]),
        window-capped: it only steers how pairs are cut into batches."""
        return min((len(query) + len(text)) // 4 + 3, self.max_length)

    # ---- async, for searches -----------------------------------------------------------
    async def start(self, batcher: MicroBatcher[Pair]) -> None:
        """Score through ``batcher`` (built over :meth:`predict`, sharing the embedding
        batcher's lanes); see :func:`open_reranker`."""
        self._batcher = batcher
        await batcher.start()

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
            self._batcher = None

    async def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
        """The reranker's score of each text for ``query`` (float32, in order), computed in
        micro-batches with other searches' pairs."""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        if self._batcher is None:
            raise RuntimeError("Reranker.start() was not called")
        pairs = [(query, text) for text in texts]
        tokens = [self.estimate_tokens(query, text) for text in texts]
        scores = await self._batcher.embed(pairs, tokens, lane="interactive")
        return scores.reshape(len(texts))


async def open_reranker(
    settings: Settings, embedding: MicroBatcher[Text], metrics: Metrics
) -> Reranker | None:
    """The configured reranker, loaded and started on ``embedding``'s threads; None when
    ``RAG_RERANKER_MODEL`` is empty. The caller stops it (before ``embedding``)."""
    if not settings.reranker_model:
        return None
    reranker = await asyncio.to_thread(
        Reranker,
        settings.reranker_model,
        device=settings.device,
        runtime=settings.embedding_runtime,
        cache_root=settings.cache_path,
    )
    batcher: MicroBatcher[Pair] = MicroBatcher(
        reranker.predict,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.rerank_batch_tokens,
        max_bulk_tokens=settings.rerank_batch_tokens,
        max_queue=settings.queue_size,
        observer=metrics.rerank_batches,
        lanes=embedding.lanes,
        kind="rerank",
    )
    await reranker.start(batcher)
    return reranker
