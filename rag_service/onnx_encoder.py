"""ONNX Runtime for the service's encoders on CPU: export, cache, probe and fallback.

A six-layer MiniLM forward on one short query is mostly PyTorch eager overhead; the same
graph on ONNX Runtime answers in about a third of the time (bulk work is another matter: see
:mod:`rag_service.runtimes`, which times ONNX Runtime against PyTorch on the host and gives
each lane the faster). Every encoder the service loads (the default embedding model, models
in ``RAG_MODELS_DIR`` including those ``rag-train embed`` writes, the cross-encoder reranker)
can run on it on CPU.

Export. The model's first sentence-transformers module (its ``Transformer``; for a
cross-encoder the whole scoring forward) is exported with ``torch.onnx.export`` (the
TorchScript exporter; ``optimum`` does not support transformers 5), with dynamic batch and
sequence axes, eager attention and a padded sample batch so the attention mask stays in the
graph. The export runs in a child process (``python -m rag_service.onnx_encoder export``):
the exporter sets process-wide state that a model serving in the same process must not see
(an in-process comparison right after an export gave a false mismatch), a crash in it
cannot take the service down, and its memory is returned when it ends. Pooling and
normalisation are not in the graph: :class:`Pooling` applies the model's own ``Pooling``
module configuration (``modules.json``: mean, CLS, max, mean-sqrt-len, in the module's
order) in NumPy. A model with any other module (``Dense``, a pooling mode this code does not
implement, ...) is :class:`Unsupported`, and PyTorch serves it.

Cache. Graphs live in the per-user model cache (:func:`rag_service.model_cache.cache_dir`,
``RAG_CACHE_DIR``) under ``onnx/<kind>-<key>[-int8]/{model.onnx,meta.json}``, where the key
hashes what the graph is made of (the transformer's ``config.json``, weights and tokenizer
configuration, the export format and opset), not the pooling configuration or the directory's
path: a copy of a model, or the same model with another pooling, reuses the graph. An entry is
written to a temporary directory and renamed into place under the cache's file lock, so two
processes starting at once export once and never see half a graph. ``meta.json`` records the
graph file's size and SHA-256; an entry that does not match (truncated, overwritten) or that
ONNX Runtime cannot open is discarded and exported again. ``RAG_EMBEDDING_QUANTIZE=int8``
adds a dynamically quantised copy (int8 per-channel weights of the MatMuls) as its own entry.

Probe. Before a graph serves, the caller's ``check`` compares it with the PyTorch model
already loaded in this process (never touched by the export) on probe texts through the
serving code path: embeddings must reach cosine >= :data:`MIN_COSINE` (int8:
:data:`MIN_COSINE_INT8`), reranker scores must agree within :data:`MAX_SCORE_DIFF`. So a
collection's stored vectors stay valid when the runtime changes. A cached graph that fails
the probe is discarded and exported once more; a fresh export that fails it is marked
``REJECTED`` (with the reason; delete the entry to try again) and PyTorch serves the model.
Every fallback is logged with its reason, and the encoder's ``runtime_note`` says it.

Threads. The two lanes (interactive queries, bulk ingest) encode on their own threads
(:mod:`rag_service.batching`), side by side, and each pass runs with the number of threads
the lanes' core accounting grants it at that moment (every core for a lane that is alone, its
share while both have work). A session's intra-op pool has a fixed size, so a graph opens
one session per thread count it may be asked for (:class:`OnnxGraph`); a one-thread session
runs on its caller's thread and serves both lanes at once. Spinning is off, so an idle pool
thread does not burn a core the other lane needs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rag_service.model_cache import _locked, cache_dir

__all__ = [
    "EXPORT_FORMAT",
    "MAX_SCORE_DIFF",
    "MIN_COSINE",
    "MIN_COSINE_INT8",
    "GraphKind",
    "OnnxGraph",
    "Pooling",
    "Unsupported",
    "check_modules",
    "graph_entry",
    "load_graph",
    "main",
    "read_pooling",
    "resolve_runtime",
]

log = logging.getLogger(__name__)

GraphKind = Literal["embedding", "cross-encoder"]
EXPORT_FORMAT = 1  # bump to re-export every cached graph
OPSET = 17
EXPORT_TIMEOUT_S = 900.0
MIN_COSINE = 0.9999
MIN_COSINE_INT8 = 0.95  # int8 changes the vectors slightly; the probe still catches garbage
MAX_SCORE_DIFF = 1e-3
GRAPH_FILE = "model.onnx"
META_FILE = "meta.json"
REJECTED_FILE = "REJECTED"
# The files a graph is made of (besides weight files, matched by suffix).
_GRAPH_INPUT_FILES = ("config.json", "tokenizer_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Pooling modes implemented here, in the order sentence-transformers concatenates them.
_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class Unsupported(Exception):
    """This encoder cannot run on ONNX Runtime here; the message says why (PyTorch serves it)."""


def resolve_runtime(runtime: str, device: str) -> tuple[str, str]:
    """``("onnx" | "torch", why)`` for ``RAG_EMBEDDING_RUNTIME`` on a resolved device, for an
    encoder that runs on one lane only (the reranker; embedding models choose per lane, see
    :mod:`rag_service.runtimes`)."""
    if runtime in ("torch", "torch-bf16"):
        return "torch", f"RAG_EMBEDDING_RUNTIME={runtime} (PyTorch fp32 for the reranker)"
    if device != "cpu":
        if runtime == "onnx":
            return (
                "torch",
                f"ONNX Runtime runs on the CPU here; the device is {device}",
            )
        return "torch", f"auto on {device}: PyTorch fp16"
    return "onnx", f"{runtime} on cpu"


# ---- the model's modules -------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Unsupported(f"{path.name} is not readable JSON: {exc}") from exc


def check_modules(model_dir: Path, kind: GraphKind) -> list[dict[str, Any]]:
    """The model's sentence-transformers modules, if this runtime can represent them: a
    ``Transformer`` first, then (embedding models) ``Pooling`` and an optional
    ``Normalize``. :class:`Unsupported` otherwise."""
    path = model_dir / "modules.json"
    if not path.is_file():
        if kind == "cross-encoder":  # a plain Hugging Face classification directory
            return [{"type": "Transformer", "path": ""}]
        raise Unsupported("no modules.json")
    modules = _read_json(path)
    if not isinstance(modules, list) or not modules:
        raise Unsupported("modules.json lists no modules")
    names = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    allowed = (
        ["Transformer"] if kind == "cross-encoder" else ["Transformer", "Pooling", "Normalize"]
    )
    if names[0] != "Transformer" or any(n not in allowed for n in names):
        raise Unsupported(
            f"its modules ({', '.join(names)}) are not {' + '.join(allowed)}: only those are "
            "exported"
        )
    if kind == "embedding" and "Pooling" not in names:
        raise Unsupported("it has no Pooling module")
    return [{**m, "type": n} for m, n in zip(modules, names, strict=True)]


@dataclass(frozen=True, slots=True)
class Pooling:
    """The model's ``Pooling`` module, applied to token embeddings in NumPy."""

    modes: tuple[str, ...]
    normalize: bool  # the model ends in a Normalize module

    def __call__(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Sentence vectors from ``hidden`` (batch, tokens, dim) and ``mask`` (batch, tokens)."""
        hidden = hidden.astype(np.float32, copy=False)
        weights = mask.astype(np.float32)[:, :, None]
        parts: list[np.ndarray] = []
        summed = counts = None
        for mode in self.modes:
            if mode == "cls":  # the first attended token
                first = mask.argmax(axis=1)
                parts.append(hidden[np.arange(len(hidden)), first])
            elif mode == "max":
                parts.append(np.where(weights > 0, hidden, -np.inf).max(axis=1))
            else:  # mean, mean_sqrt_len_tokens
                if summed is None or counts is None:
                    summed = (hidden * weights).sum(axis=1)
                    counts = np.maximum(weights.sum(axis=1), 1e-9)
                parts.append(summed / (counts if mode == "mean" else np.sqrt(counts)))
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        if self.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32, copy=False)


def read_pooling(model_dir: Path) -> Pooling:
    """The pooling the model's ``modules.json`` names; :class:`Unsupported` for a module
    or mode this runtime does not implement."""
    modules = check_modules(model_dir, "embedding")
    entry = next(m for m in modules if m["type"] == "Pooling")
    config_path = model_dir / str(entry.get("path", "")) / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise Unsupported(f"{config_path} is not a JSON object")
    raw = config.get("pooling_mode")
    if raw is None:
        active = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        modes: tuple[str, ...] = tuple(active) or ("mean",)
    else:
        modes = (raw,) if isinstance(raw, str) else tuple(str(m) for m in raw)
    unknown = [m for m in modes if m not in _POOLING_MODES]
    if unknown or not modes:
        raise Unsupported(
            f"pooling mode {', '.join(unknown) or 'none'} is not implemented for ONNX "
            f"(implemented: {', '.join(_POOLING_MODES)})"
        )
    modes = tuple(m for m in _POOLING_MODES if m in modes)  # the library's order
    return Pooling(modes, any(m["type"] == "Normalize" for m in modules))


# ---- the cache -------------------------------------------------------------------------------
def _transformer_dir(model_dir: Path, kind: GraphKind) -> Path:
    first = check_modules(model_dir, kind)[0]
    return model_dir / str(first.get("path", ""))


def graph_entry(
    model_dir: Path, kind: GraphKind, *, cache_root: Path | None = None, quantize: str = "none"
) -> Path:
    """The cache directory of ``model_dir``'s graph (whether or not it exists yet)."""
    source = _transformer_dir(model_dir, kind)
    digest = hashlib.sha256(f"{kind}\0{EXPORT_FORMAT}\0{OPSET}\0".encode())
    files = sorted(
        p
        for p in source.iterdir()
        if p.is_file() and (p.name in _GRAPH_INPUT_FILES or p.suffix in _WEIGHT_SUFFIXES)
    )
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise Unsupported(f"no weight file (*.safetensors, *.bin) in {source}")
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    root = (cache_dir() if cache_root is None else cache_root) / "onnx"
    suffix = "" if quantize == "none" else f"-{quantize}"
    return root / f"{kind}-{digest.hexdigest()[:20]}{suffix}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _invalid(entry: Path) -> str | None:
    """Why a cache entry cannot be used as it is, or None when it is complete and intact."""
    meta_path = entry / META_FILE
    graph = entry / GRAPH_FILE
    if not meta_path.is_file() or not graph.is_file():
        return "incomplete"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable {META_FILE}: {exc}"
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        return "written by another export format"
    size = graph.stat().st_size
    if size != meta.get("size"):
        return f"{GRAPH_FILE} has {size} bytes where {meta.get('size')} were written"
    if _sha256(graph) != meta.get("sha256"):
        return f"{GRAPH_FILE} does not match the checksum recorded at export"
    return None


def _discard(entry: Path, why: str) -> None:
    log.warning("discarding the cached ONNX graph %s: %s", entry, why)
    if not entry.exists():
        return
    trash = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}.discarded")
    try:
        os.replace(entry, trash)  # gone at once for every reader; then deleted
    except OSError:
        trash = entry
    shutil.rmtree(trash, ignore_errors=True)


def _write_entry(entry: Path, make: Callable[[Path], dict[str, Any]]) -> None:
    """Make an entry in a temporary directory (``make`` writes the graph there and returns
    what to record) and rename it into place."""
    tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        record = make(tmp)
        graph = tmp / GRAPH_FILE
        meta = {
            **record,
            "format": EXPORT_FORMAT,
            "size": graph.stat().st_size,
            "sha256": _sha256(graph),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reject(entry: Path, why: str) -> None:
    with contextlib.suppress(OSError):
        entry.mkdir(parents=True, exist_ok=True)
        (entry / REJECTED_FILE).write_text(why + "\n", encoding="utf-8")


def _rejected(entry: Path) -> str | None:
    try:
        return (entry / REJECTED_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _export(model_dir: Path, kind: GraphKind, target: Path) -> dict[str, Any]:
    """Export in a child process into ``target`` (a directory); what to record."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "rag_service.onnx_encoder", "export", kind, str(model_dir)]
    try:
        done = subprocess.run(
            [*command, str(target / GRAPH_FILE)],
            capture_output=True,
            text=True,
            timeout=EXPORT_TIMEOUT_S,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"the export took longer than {EXPORT_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise Unsupported(f"the ONNX export failed: {tail or f'exit status {done.returncode}'}")
    try:
        record = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise Unsupported(f"the ONNX export said nothing readable: {done.stdout[-200:]!r}") from exc
    record["export_s"] = round(time.perf_counter() - started, 2)
    record["source"] = str(model_dir)
    return dict(record)


def _quantize(source: Path, target: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.perf_counter()
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantiser warns about pre-processing on the root logger
    try:
        quantize_dynamic(
            source / GRAPH_FILE,
            target / GRAPH_FILE,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
        )
    finally:
        quiet.setLevel(level)
    meta = json.loads((source / META_FILE).read_text(encoding="utf-8"))
    return {
        **{k: meta[k] for k in ("kind", "inputs", "output", "source") if k in meta},
        "quantize": "int8",
        "quantize_s": round(time.perf_counter() - started, 2),
    }


def _ensure(model_dir: Path, kind: GraphKind, entry: Path, quantize: str) -> bool:
    """Make sure ``entry`` holds an intact graph; True when it was made now."""
    rejected = _rejected(entry)
    if rejected is not None:
        raise Unsupported(f"{rejected} (recorded in {entry}; delete it to try again)")
    if _invalid(entry) is None:
        return False
    base = entry.with_name(entry.name.rsplit("-", 1)[0])
    if quantize != "none":  # the full-precision graph first (it takes the lock itself)
        _ensure(model_dir, kind, base, "none")
    with _locked(entry.parent):
        why = _invalid(entry)  # another process may have made it meanwhile
        if why is None:
            return False
        if entry.exists():
            _discard(entry, why)
        if quantize == "none":
            log.info("exporting %s to ONNX under %s (once per model)", model_dir, entry)
            try:
                _write_entry(entry, lambda tmp: _export(model_dir, kind, tmp))
            except Unsupported as exc:
                _reject(entry, str(exc))
                raise
        else:
            log.info("quantising %s to %s under %s", base.name, quantize, entry)
            _write_entry(entry, lambda tmp: _quantize(base, tmp))
    return True


# ---- sessions --------------------------------------------------------------------------------
class OnnxGraph:
    """A cached graph opened with one session per thread count (see the module docstring)."""

    def __init__(self, entry: Path, threads: Iterable[int]) -> None:
        import onnxruntime as ort

        self.entry = entry
        self.meta: dict[str, Any] = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
        self.threads = sorted({max(1, int(n)) for n in threads} or {1})
        self._sessions: dict[int, Any] = {}
        for n in self.threads:
            options = ort.SessionOptions()
            options.intra_op_num_threads = n
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._sessions[n] = ort.InferenceSession(
                str(entry / GRAPH_FILE), options, providers=["CPUExecutionProvider"]
            )
        first = self._sessions[self.threads[0]]
        self.inputs: list[str] = [i.name for i in first.get_inputs()]
        self.output: str = first.get_outputs()[0].name
        self.quantize: str = str(self.meta.get("quantize", "none"))

    def session(self, threads: int) -> Any:
        """The session with the most threads that does not exceed ``threads``."""
        fitting = [n for n in self.threads if n <= threads]
        return self._sessions[fitting[-1] if fitting else self.threads[0]]

    def run(self, features: Mapping[str, np.ndarray], threads: int = 1) -> np.ndarray:
        """The graph's output for int64 ``features`` (batch, tokens), computed with up to
        ``threads`` intra-op threads. Blocking; thread-safe."""
        feeds = {name: features[name] for name in self.inputs}
        out = self.session(threads).run([self.output], feeds)[0]
        return np.asarray(out)


def load_graph(
    model_dir: Path,
    kind: GraphKind,
    *,
    check: Callable[[OnnxGraph], str | None],
    cache_root: Path | None = None,
    quantize: str = "none",
    threads: Iterable[int] = (1,),
) -> OnnxGraph:
    """``model_dir``'s graph, exported or taken from the cache, opened, and accepted by
    ``check`` (None = it reproduces the PyTorch model; else why not), with a session for
    each of ``threads``. :class:`Unsupported`, saying why, when it cannot be used (see the
    module docstring)."""
    try:
        entry = graph_entry(model_dir, kind, cache_root=cache_root, quantize=quantize)
        for _ in range(2):
            fresh = _ensure(model_dir, kind, entry, quantize)
            try:
                graph = OnnxGraph(entry, threads)
            except Exception as exc:  # ONNX Runtime refuses the file: its errors are untyped
                _discard(entry, f"ONNX Runtime cannot open it: {type(exc).__name__}: {exc}")
                if fresh:
                    raise Unsupported(
                        f"ONNX Runtime cannot open the exported graph: {exc}"
                    ) from exc
                continue
            try:
                problem = check(graph)
            except Exception as exc:  # a graph that does not fit the features it is fed
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                return graph
            if fresh:
                why = f"the exported graph does not reproduce PyTorch: {problem}"
                _reject(entry, why)
                raise Unsupported(why)
            _discard(entry, f"it does not reproduce PyTorch ({problem})")
        raise Unsupported("the ONNX graph could not be made usable")  # pragma: no cover
    except OSError as exc:
        raise Unsupported(f"the ONNX cache could not be used: {exc}") from exc


def probe_cosine(ours: np.ndarray, reference: np.ndarray) -> float:
    """The smallest cosine between corresponding rows (1.0 for identical directions)."""
    if ours.shape != reference.shape:
        raise ValueError(f"the graph gives shape {ours.shape}, PyTorch {reference.shape}")
    a = ours / np.maximum(np.linalg.norm(ours, axis=1, keepdims=True), 1e-12)
    b = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(a * b, axis=1)))


# ---- the export, in a child process ------------------------------------------------------------
_SAMPLE_TEXTS = ["a short text", "a somewhat longer text, so that the batch is padded"]


def _export_graph(kind: GraphKind, model_dir: str, out: str) -> dict[str, Any]:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    eager = {"attn_implementation": "eager"}  # every attention op explicit in the graph
    module: torch.nn.Module
    if kind == "embedding":
        from sentence_transformers import SentenceTransformer

        model: Any = SentenceTransformer(model_dir, device="cpu", model_kwargs=eager)
        module, key = model[0], "token_embeddings"
        sample = (getattr(model, "preprocess", None) or model.tokenize)(_SAMPLE_TEXTS)
    else:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(model_dir, device="cpu", model_kwargs=eager, local_files_only=True)
        module, key = model, "scores"
        sample = model.preprocess([(t, t[::-1]) for t in _SAMPLE_TEXTS])
    model.eval()
    names = [k for k, v in sample.items() if isinstance(v, torch.Tensor)]
    extra = {k: v for k, v in sample.items() if not isinstance(v, torch.Tensor)}

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.inner({**extra, **dict(zip(names, tensors, strict=True))})[key]
            return out

    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[key] = {0: "batch", 1: "sequence"} if kind == "embedding" else {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            Graph(),
            tuple(sample[n] for n in names),
            out,
            input_names=names,
            output_names=[key],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx
    import onnxruntime
    import transformers

    onnx.checker.check_model(out)
    return {
        "kind": kind,
        "inputs": names,
        "output": key,
        "opset": OPSET,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rag_service.onnx_encoder export KIND MODEL_DIR OUT.onnx``: prints what it
    exported as one JSON line (the service runs this itself; see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m rag_service.onnx_encoder")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="export a model directory to an ONNX graph")
    export.add_argument("kind", choices=["embedding", "cross-encoder"])
    export.add_argument("model_dir")
    export.add_argument("out")
    args = parser.parse_args(argv)
    record = _export_graph(args.kind, args.model_dir, args.out)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
