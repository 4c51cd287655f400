"""The embedding models a service serves: its default model plus any a collection records.

Every collection records the identifier of the model its vectors were made by
(``embedding_model``) and is searched and written with that model, so several models serve
side by side: the default (``RAG_EMBEDDING_MODEL``), which new collections use, and any other
that a collection was moved to (``POST /v1/collections/{name}/reindex``). Each loaded model
has its own :class:`~rag_service.embedding.Embedder` and
:class:`~rag_service.batching.MicroBatcher`; the extra batchers take turns on the default
batcher's threads, so models never fight over the cores. Every model runs on the runtimes
``RAG_EMBEDDING_RUNTIME`` gives it (auto: each lane the runtime measured fastest on this host
among PyTorch, PyTorch bf16 and ONNX Runtime, each probed against PyTorch fp32 first; see
:mod:`rag_service.runtimes`), a model fine-tuned with ``rag-train embed`` like any other
directory.

Identifiers, stable across restarts and replicas:

* the default model: its name as collections have always recorded it
  (:func:`~rag_service.embedding.model_name_for`: ``sentence-transformers/all-MiniLM-L6-v2``
  for the bundled model, else the directory's name);
* the bundled all-MiniLM-L6-v2, by that same name, even when another default is set;
* a model in the models directory (``RAG_MODELS_DIR``, default ``<data_dir>/models``, where
  ``rag-train embed --output`` can write): its path relative to that directory, such as
  ``minilm-support`` or ``team/minilm-v2``.

Models are loaded at start for the collections that record them, and on demand (a reindex, or
a collection another replica moved). A collection whose model cannot be loaded is refused
with 409, saying why; the attempt is repeated after :data:`RETRY_FAILED_S`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexes.types import CollectionRow
from rag_service.batching import MicroBatcher
from rag_service.embedding import BUNDLED_NAME, Embedder, Text
from rag_service.errors import EmbeddingMismatch, InvalidRequest
from rag_service.settings import Settings, bundled_embedding_model

__all__ = [
    "RETRY_FAILED_S",
    "WORSE_THAN_BASE",
    "EmbeddingModels",
    "LoadedModel",
    "ModelLoadError",
    "QueryCache",
    "check_model_dir",
]

log = logging.getLogger(__name__)

RETRY_FAILED_S = 30.0
# Written by `rag-train embed` beside a model that scored worse than its base.
WORSE_THAN_BASE = "WORSE_THAN_BASE"


class ModelLoadError(Exception):
    """A model directory could not be loaded as a sentence-transformers embedding model."""


class QueryCache:
    """The vectors of recent search queries by exact text, least recently used first out,
    at most ``size`` of them: a repeated query skips the encoder, and a miss costs one dict
    lookup. One per loaded model, so a vector never serves another model; a model loaded
    again (another directory under the same identifier after a reindex) starts empty."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0

    def get(self, text: str) -> np.ndarray | None:
        vector = self._vectors.get(text)
        if vector is not None:
            self._vectors.move_to_end(text)
            self.hits += 1
        return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        if self.size <= 0:
            return
        vector.setflags(write=False)  # shared by every search that repeats the query
        self._vectors[text] = vector
        self._vectors.move_to_end(text)
        while len(self._vectors) > self.size:
            self._vectors.popitem(last=False)

    def __len__(self) -> int:
        return len(self._vectors)


@dataclass(eq=False, slots=True)
class LoadedModel:
    """One embedding model in service: its identifier, directory, encoder and batcher."""

    id: str
    path: Path
    embedder: Embedder
    batcher: MicroBatcher[Text]
    queries: QueryCache = field(default_factory=lambda: QueryCache(0))

    @property
    def dimension(self) -> int:
        return self.embedder.dimension

    async def embed_query(self, text: str) -> np.ndarray:
        """The (1, dimension) vector of a search query on the interactive lane, from the
        query cache when the same text was searched recently."""
        vector = self.queries.get(text)
        if vector is None:
            # The token count only steers batching: an estimate saves a tokenizer pass on
            # the event loop (the encoder tokenises the query anyway).
            estimate = self.embedder.estimate_tokens(text)
            vector = await self.batcher.embed([text], [estimate], lane="interactive")
            self.queries.put(text, vector)
        return vector

    async def embed_bulk(self, texts: list[str]) -> np.ndarray:
        """Vectors of ``texts`` on the bulk lane (as document chunks are embedded)."""
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        tokens = await asyncio.to_thread(self.embedder.count_tokens, texts)
        return await self.batcher.embed(texts, tokens, lane="bulk")


def check_model_dir(path: Path) -> None:
    """ValueError, saying why, unless ``path`` holds a sentence-transformers embedding model
    (``modules.json``; not a CrossEncoder or another kind of model)."""
    if not path.is_dir():
        raise ValueError("is not a directory")
    if not (path / "modules.json").is_file():
        raise ValueError("is not a sentence-transformers model directory (no modules.json)")
    config = path / "config_sentence_transformers.json"
    if config.is_file():
        try:
            kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(f"has an unreadable {config.name}: {exc}") from exc
        if kind not in (None, "SentenceTransformer"):
            raise ValueError(f"holds a {kind} model, not a sentence embedding model")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class EmbeddingModels:
    """The loaded embedding models, by identifier (see the module docstring)."""

    def __init__(self, settings: Settings, default: LoadedModel) -> None:
        self.settings = settings
        self.default = default
        self._loaded: dict[str, LoadedModel] = {default.id: default}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # id -> (when, why)

    @classmethod
    def serving(
        cls, settings: Settings, embedder: Embedder, batcher: MicroBatcher[Text]
    ) -> EmbeddingModels:
        """The registry of a service whose default model is ``embedder`` on ``batcher``."""
        default = LoadedModel(
            embedder.name,
            Path(embedder.path),
            embedder,
            batcher,
            QueryCache(settings.query_cache_size),
        )
        return cls(settings, default)

    @property
    def models_dir(self) -> Path:
        return self.settings.models_path

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def find(self, model_id: str) -> LoadedModel | None:
        """A loaded model by identifier (the default also by its last path part, as an
        OpenAI client may name it)."""
        found = self._loaded.get(model_id)
        if found is None and model_id == self.default.id.rsplit("/", 1)[-1]:
            return self.default
        return found

    # ---- identifiers and directories ------------------------------------------------------
    def locate(self, model_id: str) -> Path | None:
        """The directory of a recorded identifier, or None when this service has none."""
        if model_id == self.default.id:
            return self.default.path
        if model_id == BUNDLED_NAME:
            return Path(bundled_embedding_model())
        candidate = Path(model_id)
        if not model_id or candidate.is_absolute() or ".." in candidate.parts:
            return None
        root = self.models_dir.resolve()
        try:
            path = (root / candidate).resolve()
            return path if _inside(path, root) and path.is_dir() else None
        except OSError:  # a name the filesystem refuses
            return None

    def choose(self, raw: str) -> tuple[str, Path]:
        """The identifier and directory of a model named in a request (a directory inside the
        models directory, relative or absolute, or the default's or the bundled model's
        identifier); :class:`InvalidRequest` naming ``embedding_model`` otherwise."""

        def refuse(why: str) -> InvalidRequest:
            return InvalidRequest(f"embedding_model {raw[:200]!r} {why}", param="embedding_model")

        raw = raw.strip()
        if raw in (self.default.id, BUNDLED_NAME):
            path = self.locate(raw)
            assert path is not None
            return raw, path
        root = self.models_dir.resolve()
        candidate = Path(raw)
        if not raw or "\x00" in raw or ".." in candidate.parts:
            raise refuse(f"must name a directory inside the models directory {root}")
        try:
            full = (candidate if candidate.is_absolute() else root / candidate).resolve()
            if not _inside(full, root) or full == root:
                raise refuse(
                    f"is not inside the models directory {root} (RAG_MODELS_DIR; symlinks "
                    "are followed)"
                )
            if not full.exists():
                raise refuse(f"does not exist in the models directory {root} (RAG_MODELS_DIR)")
            check_model_dir(full)
        except (OSError, ValueError) as exc:  # a name the filesystem refuses, a bad directory
            raise refuse(str(exc)) from exc
        model_id = full.relative_to(root).as_posix()
        if model_id == self.default.id and full != self.default.path.resolve():
            raise refuse(
                f"has the identifier of the default model ({self.default.path}) but is "
                "another directory: rename it"
            )
        return model_id, full

    # ---- loading ----------------------------------------------------------------------------
    async def load(self, model_id: str, path: Path) -> LoadedModel:
        """The model ``model_id`` from ``path``, loaded once (concurrent callers wait for the
        same load); :class:`ModelLoadError` when it cannot be."""
        found = self._loaded.get(model_id)
        if found is not None:
            return found
        lock = self._locks.setdefault(model_id, asyncio.Lock())
        async with lock:
            found = self._loaded.get(model_id)
            if found is not None:
                return found
            try:
                check_model_dir(path)
            except ValueError as exc:
                raise ModelLoadError(f"{path} {exc}") from exc
            s = self.settings
            try:
                embedder = await asyncio.to_thread(
                    Embedder,
                    str(path),
                    device=s.device,
                    runtime=s.embedding_runtime,
                    quantize=s.embedding_quantize,
                    cache_root=s.cache_path,
                )
            except Exception as exc:  # third-party loading fails in many ways: wrapped here
                raise ModelLoadError(
                    f"{path} could not be loaded: {type(exc).__name__}: {exc}"
                ) from exc
            batcher: MicroBatcher[Text] = MicroBatcher(
                embedder.encode,
                encode_bulk=embedder.encode_bulk,
                max_bulk_tokens=s.max_bulk_tokens,
                max_batch_size=s.max_batch_size,
                max_batch_tokens=s.max_batch_tokens,
                max_queue=s.queue_size,
                lanes=self.default.batcher.lanes,  # take turns with the default
            )
            await batcher.start()
            model = LoadedModel(model_id, path, embedder, batcher, QueryCache(s.query_cache_size))
            self._loaded[model_id] = model
            self._failed.pop(model_id, None)
            log.info(
                "embedding model %s loaded from %s, runtime %s (%s)",
                model_id,
                path,
                embedder.runtime,
                embedder.runtime_note,
            )
            return model

    async def get(self, model_id: str) -> LoadedModel:
        """A recorded model, loaded if need be; :class:`ModelLoadError` saying why not."""
        found = self._loaded.get(model_id)
        if found is not None:
            return found
        failed = self._failed.get(model_id)
        if failed is not None and time.monotonic() - failed[0] < RETRY_FAILED_S:
            raise ModelLoadError(failed[1])
        path = self.locate(model_id)
        try:
            if path is None:
                raise ModelLoadError(
                    f"no directory {model_id!r} in the models directory {self.models_dir} "
                    "(RAG_MODELS_DIR)"
                )
            return await self.load(model_id, path)
        except ModelLoadError as exc:
            self._failed[model_id] = (time.monotonic(), str(exc))
            raise

    async def for_collection(self, row: CollectionRow) -> LoadedModel:
        """The model that embeds for a collection; :class:`EmbeddingMismatch` (409) when this
        service cannot load it or it makes vectors of another dimension."""
        try:
            model = await self.get(row.embedding_model)
        except ModelLoadError as exc:
            raise EmbeddingMismatch(
                f"collection {row.name!r} was embedded with {row.embedding_model} (dimension "
                f"{row.dimension}), which this service cannot load ({exc}); it serves "
                f"{self.default.id} by default. Put that model in RAG_MODELS_DIR as "
                f"{row.embedding_model!r}, or move the collection to a model this service has "
                f"with POST /v1/collections/{row.name}/reindex",
                param="collection",
            ) from exc
        if model.dimension != row.dimension:
            raise EmbeddingMismatch(
                f"collection {row.name!r} holds vectors of dimension {row.dimension} but its "
                f"model {row.embedding_model} makes vectors of dimension {model.dimension}",
                param="collection",
            )
        return model

    async def preload(self, model_ids: Iterable[str]) -> None:
        """Load the models these identifiers name (at start); a failure is logged and the
        collections that need the model answer 409 until it loads."""
        for model_id in dict.fromkeys(model_ids):
            try:
                await self.get(model_id)
            except ModelLoadError as exc:
                log.error("embedding model %s cannot be loaded: %s", model_id, exc)

    async def close(self) -> None:
        """Stop the batchers of the models this registry loaded (not the default's)."""
        for model in list(self._loaded.values()):
            if model is not self.default:
                await model.batcher.stop()
        self._loaded = {self.default.id: self.default}
