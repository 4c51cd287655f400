"""What runs an encoder's forward pass on each lane, chosen by measurement on this host.

Runtimes, by the names ``/ready`` shows:

* ``torch``: PyTorch in fp32 on the CPU (fp16 on CUDA). The reference: every other runtime
  is checked against it before it serves.
* ``torch-bf16``: the same fp32 weights under bf16 autocast, on a CPU with bf16 instructions
  (AMX or AVX512-BF16): matrix products run in bf16, accumulations and the rest in fp32.
* ``onnx`` (``onnx-int8`` with ``RAG_EMBEDDING_QUANTIZE=int8``): the model's graph on ONNX
  Runtime (:mod:`rag_service.onnx_encoder`).

Interchangeable vectors. A runtime other than ``torch`` serves only after its vectors for the
probe texts reach cosine >= :data:`~rag_service.onnx_encoder.MIN_COSINE` with PyTorch fp32
(int8: :data:`~rag_service.onnx_encoder.MIN_COSINE_INT8`), so chunks embedded on one lane's
runtime and queries on the other's meet in the same space, and a collection keeps its vectors
when the choice changes.

The choice (``RAG_EMBEDDING_RUNTIME=auto`` on CPU). Which runtime is fastest depends on the
CPU and on the work, and a rule fixed in code is wrong somewhere: on the 2-core Sapphire
Rapids VM of the benchmarks ONNX Runtime encodes one short query in 2.7 ms against PyTorch's
8.3, while PyTorch under bf16 autocast (AMX) embeds ~120-token chunks at about 100 a second
against ONNX Runtime's 53 and PyTorch fp32's 59; without AMX the bulk order is another. So
each candidate that passed its probe is timed on this host (:func:`measure`: a length-sorted
bulk pass in sub-batches, and one short query, on every core), and each lane takes its winner
(:func:`choose`): the bulk lane the most texts per second, the interactive lane the fastest
query. The timings are cached in the model cache under a key of the model's files and the
host (CPU model and bf16 flags, cores, library versions), so later starts decide at once.
``RAG_EMBEDDING_RUNTIME=torch|torch-bf16|onnx`` forces one runtime on both lanes.

Threads. A forward pass is called with the number of threads the lanes' core accounting
grants it (:class:`~rag_service.batching.LaneThreads`). ONNX Runtime picks the session of that
size; PyTorch sets its intra-op threads for the calling thread (OpenMP keeps the setting per
thread) and puts the process default back afterwards, so threads that start later (the local
chat model's) do not inherit a lane's share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from rag_service.onnx_encoder import OnnxGraph, Pooling

__all__ = [
    "BULK_SUB_BATCH_TOKENS",
    "Choice",
    "Features",
    "Forward",
    "Measured",
    "OnnxForward",
    "RuntimeName",
    "TorchForward",
    "choose",
    "cpu_has_bf16",
    "host_key",
    "measure",
    "read_timings",
    "sub_batches",
    "write_timings",
]

log = logging.getLogger(__name__)

RuntimeName = Literal["torch", "torch-bf16", "onnx", "onnx-int8"]
LaneName = Literal["interactive", "bulk"]
Features = Mapping[str, np.ndarray]  # int64 (batch, tokens): input_ids, attention_mask, ...
TIMINGS_FORMAT = 1  # bump to measure every host again
# Bulk work is cut into sub-batches of about this many tokens (padding included): near the
# best throughput of every runtime measured (8 texts of ~120 tokens), and short enough (tens
# of ms) that an ingest gives cores back to a query within one pass.
BULK_SUB_BATCH_TOKENS = 1024
QUERY_RUNS = 15
ROUNDS = 2


class Forward(Protocol):
    """One runtime's forward pass: sentence vectors (not yet normalised) for features."""

    name: RuntimeName

    def __call__(self, features: Features, threads: int) -> np.ndarray: ...


class TorchForward:
    """PyTorch: fp32 (or the dtype the model was loaded in, fp16 on CUDA), or bf16 autocast."""

    def __init__(
        self,
        model: Any,
        *,
        bf16: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        import torch

        self.name: RuntimeName = "torch-bf16" if bf16 else "torch"
        self._model = model
        self._device = model.device
        self._cpu = self._device.type == "cpu"
        self._bf16 = bf16
        self._extra = dict(extra or {})  # non-tensor features the model expects
        self._default_threads = torch.get_num_threads()

    def __call__(self, features: Features, threads: int) -> np.ndarray:
        import torch

        inputs: dict[str, Any] = dict(self._extra)
        for key, value in features.items():
            inputs[key] = torch.from_numpy(np.ascontiguousarray(value)).to(self._device)
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16) if self._bf16 else contextlib.nullcontext()
        )
        with self._threads(threads), torch.inference_mode(), autocast:
            out = self._model.forward(inputs)["sentence_embedding"]
        result: np.ndarray = out.float().cpu().numpy()
        return result

    @contextlib.contextmanager
    def _threads(self, n: int) -> Iterator[None]:
        if not self._cpu:
            yield
            return
        import torch

        torch.set_num_threads(max(1, n))  # this thread's OpenMP setting, and the default
        try:
            yield
        finally:
            torch.set_num_threads(self._default_threads)  # the default for new threads


class OnnxForward:
    """The exported graph on ONNX Runtime, pooled in NumPy as the model's Pooling module."""

    def __init__(self, graph: OnnxGraph, pooling: Pooling) -> None:
        self.name: RuntimeName = "onnx-int8" if graph.quantize == "int8" else "onnx"
        self.graph = graph
        self._pooling = pooling

    def __call__(self, features: Features, threads: int) -> np.ndarray:
        return self._pooling(self.graph.run(features, threads), features["attention_mask"])


def sub_batches(
    lengths: Sequence[int],
    budget: int = BULK_SUB_BATCH_TOKENS,
    *,
    slack: float = 1.3,
    min_span: int = 4,
) -> list[list[int]]:
    """Indices sorted by length and cut into runs of similar length (the longest at most
    ``slack`` times the shortest, or ``min_span`` tokens more) whose padded size (rows x
    longest) stays within ``budget`` tokens (at least one text each): little padding, and
    passes short enough to give cores back between them."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    out: list[list[int]] = []
    for i in order:
        if out:
            group = out[-1]
            first = lengths[group[0]]
            similar = lengths[i] <= max(first * slack, first + min_span)
            if similar and (len(group) + 1) * lengths[i] <= budget:
                group.append(i)
                continue
        out.append([i])
    return out


# ---- the host ------------------------------------------------------------------------------
def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16): without them
    bf16 autocast is emulated and slower than fp32, so it is not worth measuring."""
    return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})


def host_key(cores: int) -> dict[str, Any]:
    """What the timings depend on besides the model: the CPU, its cores, the libraries."""
    versions = {}
    for package in ("torch", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    flags = sorted(_cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return {"cpu": _cpu_model(), "flags": flags, "cores": cores, "versions": versions}


# ---- measuring -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Measured:
    """One runtime's timings on this host, every core."""

    runtime: str
    bulk_texts_per_s: float
    query_ms: float


def measure(
    candidates: Sequence[Forward],
    bulk: Sequence[Features],
    query: Features,
    threads: int,
) -> list[Measured]:
    """Time each runtime on the bulk sub-batches (texts per second) and on one query (the
    median of :data:`QUERY_RUNS`). The runtimes take turns, :data:`ROUNDS` times, and each
    keeps its best round, so a burst of other work on the machine does not decide alone."""
    texts = sum(len(f["input_ids"]) for f in bulk)
    for forward in candidates:  # warm-up: first-call allocations, kernels, AMX set-up
        forward(bulk[0], threads)
        for _ in range(3):
            forward(query, threads)
    best_bulk = dict.fromkeys(range(len(candidates)), float("inf"))
    best_query = dict.fromkeys(range(len(candidates)), float("inf"))
    for _ in range(ROUNDS):
        for i, forward in enumerate(candidates):
            started = time.perf_counter()
            for features in bulk:
                forward(features, threads)
            best_bulk[i] = min(best_bulk[i], time.perf_counter() - started)
            runs = []
            for _ in range(QUERY_RUNS):
                started = time.perf_counter()
                forward(query, threads)
                runs.append(time.perf_counter() - started)
            best_query[i] = min(best_query[i], statistics.median(runs))
    return [
        Measured(f.name, round(texts / best_bulk[i], 2), round(best_query[i] * 1000, 3))
        for i, f in enumerate(candidates)
    ]


@dataclass(frozen=True, slots=True)
class Choice:
    """The runtime of one lane and why."""

    runtime: str
    why: str


def choose(measured: Sequence[Measured]) -> dict[LaneName, Choice]:
    """The fastest runtime per lane: the most bulk texts per second, the fastest query."""
    bulk = max(measured, key=lambda m: m.bulk_texts_per_s)
    query = min(measured, key=lambda m: m.query_ms)
    rates = ", ".join(f"{m.runtime} {m.bulk_texts_per_s:g}" for m in measured)
    times = ", ".join(f"{m.runtime} {m.query_ms:g} ms" for m in measured)
    return {
        "interactive": Choice(query.runtime, f"fastest one query measured here ({times})"),
        "bulk": Choice(bulk.runtime, f"fastest bulk texts/s measured here ({rates})"),
    }


# ---- the cache -----------------------------------------------------------------------------
def _timings_path(cache_root: Path, model_key: str, host: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(
        json.dumps({"format": TIMINGS_FORMAT, **host}, sort_keys=True).encode()
    ).hexdigest()[:16]
    return cache_root / "runtimes" / f"{model_key}-{digest}.json"


def read_timings(
    cache_root: Path, model_key: str, host: Mapping[str, Any], runtimes: Sequence[str]
) -> list[Measured] | None:
    """The cached timings of exactly these runtimes on this host, or None."""
    path = _timings_path(cache_root, model_key, host)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        measured = [Measured(**row) for row in body["measured"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if sorted(m.runtime for m in measured) != sorted(runtimes):
        return None
    return measured


def write_timings(
    cache_root: Path, model_key: str, host: Mapping[str, Any], measured: Sequence[Measured]
) -> None:
    """Cache the timings (written aside and renamed into place; failures only logged)."""
    path = _timings_path(cache_root, model_key, host)
    body = {
        "format": TIMINGS_FORMAT,
        "host": dict(host),
        "measured": [asdict(m) for m in measured],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not cache the runtime timings in %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


def timed_choice(
    candidates: Mapping[str, Forward],
    make_features: Callable[[], tuple[list[Features], Features]],
    *,
    cores: int,
    cache_root: Path,
    model_key: str,
) -> tuple[dict[LaneName, Choice], list[Measured], bool]:
    """Each lane's runtime among ``candidates`` (already probed): from the cached timings of
    this host, else measured now and cached. Also the timings, and whether they were cached."""
    host = host_key(cores)
    measured = read_timings(cache_root, model_key, host, list(candidates))
    cached = measured is not None
    if measured is None:
        bulk, query = make_features()
        measured = measure(list(candidates.values()), bulk, query, cores)
        write_timings(cache_root, model_key, host, measured)
    return choose(measured), measured, cached
