"""Configuration of ``rag-train embed`` and ``rag-train rerank``: one frozen dataclass each.

Both share the data, split, mining and stopping settings (:class:`RetrieverConfig`); they
differ in defaults (a cross-encoder sees each query with several negatives at once, so it
takes fewer queries a step and more negatives) and in what the reranker adds: the dense
model that supplies its candidates and how many of them it reorders. The dataclass drives
the CLI flags (``--help`` names each field) and is saved to ``training_config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "WORSE_THAN_BASE_EXIT",
    "EmbedConfig",
    "RerankConfig",
    "RetrieverConfig",
    "service_url",
]

# Exit status of a finished run whose model is worse than base on the validation split.
WORSE_THAN_BASE_EXIT = 3


def _h(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def service_url() -> str:
    """The service the CLI talks to: ``RAG_URL``, else ``http://RAG_HOST:RAG_PORT``."""
    from rag_service.cli.client import default_url

    return default_url()


@dataclass(frozen=True, kw_only=True)
class RetrieverConfig:
    """Settings common to both trainers; saved (without the API key) with the model."""

    output_dir: Path = field(metadata=_h("where the trained model is written"))
    qa_file: Path | None = field(
        default=None,
        metadata=_h(
            'labelled questions JSONL: {"question", "document_id" | "document_ids" | '
            '"answer"} a line; needs --corpus or --collection'
        ),
    )
    chat_file: Path | None = field(
        default=None, metadata=_h("chat JSONL (as for lora): user turn -> assistant answer")
    )
    corpus: Path | None = field(
        default=None, metadata=_h('documents JSONL: {"id", "text", "metadata"?} a line')
    )
    collection: str | None = field(
        default=None, metadata=_h("read the corpus from this collection of a running service")
    )
    url: str = field(
        default="", metadata=_h("service URL [env RAG_URL, else http://RAG_HOST:RAG_PORT]")
    )
    api_key: str | None = field(
        default=None, metadata=_h("bearer key for the service [env RAG_API_KEY]")
    )
    pseudo_queries: bool = field(
        default=False,
        metadata=_h("headings and metadata titles of the corpus as queries for their section"),
    )
    question_writer: str | None = field(
        default=None,
        metadata=_h(
            "have the service's generation backend write a question per passage with this "
            "model name ('default': the service's own)"
        ),
    )
    questions_per_document: int = field(
        default=1, metadata=_h("passages per document the question writer asks about")
    )
    base_model: str = field(default="", metadata=_h("model to start from (empty: bundled MiniLM)"))
    epochs: int = field(default=4, metadata=_h("most passes over the training pairs"))
    batch_size: int = field(default=16, metadata=_h("queries per step"))
    learning_rate: float = field(default=2e-5, metadata=_h("peak learning rate (AdamW)"))
    warmup_ratio: float = field(default=0.1, metadata=_h("share of steps warming up"))
    weight_decay: float = field(default=0.01, metadata=_h("AdamW weight decay"))
    hard_negatives: int = field(default=1, metadata=_h("mined negatives per query (0: none)"))
    mine_top: int = field(
        default=30, metadata=_h("mine negatives among this many top passages of the base model")
    )
    negative_margin: float = field(
        default=0.05,
        metadata=_h(
            "skip candidates scoring above (1 - margin) x the positive's score: likely "
            "unlabelled positives or near-duplicates (below 0: admit some that outscore it)"
        ),
    )
    val_fraction: float = field(default=0.2, metadata=_h("share of pairs held out to validate"))
    split: Literal["document", "query"] = field(
        default="document",
        metadata=_h(
            "hold out whole documents (no document on both sides) or single queries",
            choices=("document", "query"),
        ),
    )
    patience: int = field(
        default=2,
        metadata=_h("stop after this many epochs without a better validation MRR (0: never)"),
    )
    max_length: int = field(default=256, metadata=_h("longest input in tokens (truncated)"))
    chunk_tokens: int = field(default=200, metadata=_h("passage length in tokens (as served)"))
    chunk_overlap: int = field(default=40, metadata=_h("overlap between passages in tokens"))
    train_word_embeddings: bool = field(
        default=False,
        metadata=_h(
            "train the word-embedding matrix too (frozen by default: half the weights, "
            "faster steps, and little to gain from a few thousand pairs)"
        ),
    )
    seed: int = field(default=42, metadata=_h("random seed (split, order, initialisation)"))
    allow_worse: bool = field(
        default=False,
        metadata=_h(
            f"exit 0 even when the trained model is worse than base (otherwise exit "
            f"{WORSE_THAN_BASE_EXIT})"
        ),
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"--{name.replace('_', '-')}: {why}")

        for name in ("epochs", "batch_size", "mine_top", "max_length", "questions_per_document"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("hard_negatives", "patience"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.learning_rate <= 0:
            raise bad("learning_rate", "must be positive")
        if not 0 < self.val_fraction < 1:
            raise bad("val_fraction", "must be in (0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if not -1 <= self.negative_margin < 1:
            raise bad("negative_margin", "must be in [-1, 1)")
        if self.split not in ("document", "query"):
            raise bad("split", "must be document or query")
        if self.corpus is not None and self.collection is not None:
            raise bad("collection", "give --corpus or --collection, not both")
        has_corpus = self.corpus is not None or self.collection is not None
        if not (self.qa_file or self.chat_file or self.pseudo_queries or self.question_writer):
            raise bad(
                "qa_file",
                "no training data: give --qa-file, --chat-file, --pseudo-queries or "
                "--question-writer",
            )
        for name in ("qa_file", "pseudo_queries", "question_writer"):
            if getattr(self, name) and not has_corpus:
                raise bad(name, "needs a corpus: --corpus FILE or --collection NAME")
        from rag_service.chunking import ChunkingConfig

        try:
            ChunkingConfig(self.chunk_tokens, self.chunk_overlap)
        except ValueError as exc:
            raise bad("chunk_tokens", str(exc)) from exc

    @property
    def service(self) -> str:
        return self.url or service_url()

    def to_dict(self) -> dict[str, Any]:
        """Every setting, for training_config.json; the API key is never written."""
        out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        out.pop("api_key", None)
        return out


@dataclass(frozen=True, kw_only=True)
class EmbedConfig(RetrieverConfig):
    """Fine-tune the embedding model: in-batch negatives plus mined hard negatives."""

    scale: float = field(
        default=20.0, metadata=_h("similarity scale (inverse temperature) of the ranking loss")
    )


@dataclass(frozen=True, kw_only=True)
class RerankConfig(RetrieverConfig):
    """Train a cross-encoder on positives and mined negatives, to reorder dense candidates."""

    batch_size: int = field(default=8, metadata=_h("queries per step (each with its negatives)"))
    learning_rate: float = field(default=1e-4, metadata=_h("peak learning rate (AdamW)"))
    hard_negatives: int = field(default=3, metadata=_h("mined negatives per query"))
    head_learning_rate: float = field(
        default=2e-3,
        metadata=_h("learning rate of a scoring head made new from an embedding model"),
    )
    embedding_model: str = field(
        default="",
        metadata=_h("dense model that supplies candidates and negatives (empty: bundled)"),
    )
    candidates: int = field(
        default=20, metadata=_h("dense top-N passages the reranker reorders when evaluated")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hard_negatives < 1:
            raise ValueError("--hard-negatives: a reranker needs at least 1")
        if self.candidates < 2:
            raise ValueError("--candidates: must be at least 2")
