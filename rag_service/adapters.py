"""Fine-tuned adapters in the running service: path and file checks, a persistent registry.

An adapter is a PEFT LoRA directory made by ``rag-train`` (``adapter_config.json`` +
``adapter_model.safetensors``). Paths are resolved inside ``RAG_ADAPTERS_DIR``: absolute paths
outside it, ``..`` and symlinks leading out (the directory's or any file's in it) are refused,
and so are pickled weights (``adapter_model.bin``). Before a backend sees an adapter, its config
is checked (a JSON object, ``peft_type`` LORA, ``r`` a positive integer within
``RAG_MAX_LORA_RANK``, ``lora_alpha`` a number, ``target_modules`` a string or a list of
strings, ...) and so is the safetensors header (read without loading a tensor): float tensors,
``lora_A``/``lora_B`` pairs whose rank is the configured one. The registry
(``<data_dir>/adapters.json``) is the truth about what is loaded; a restart loads the same
adapters again. Every load of a name gets a new version, so a backend that caches by name (vLLM)
sees ``name@version`` and never serves stale weights.

:class:`AdapterManager` owns every adapter decision of the service, over an
:class:`~rag_service.backends.base.AdapterBackend` (the app makes one only for a backend with
that capability): load and unload, and for a chat, whether its ``model`` names an adapter
(:meth:`~AdapterManager.serves`) and the name the backend serves it under while the request
holds it (:meth:`~AdapterManager.acquire` / :meth:`~AdapterManager.release`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from indexes.engine import AdapterStore
from rag_service.backends.base import AdapterBackend
from rag_service.errors import Conflict, InvalidRequest, NotFound

__all__ = [
    "LORA_KEY",
    "AdapterInfo",
    "AdapterManager",
    "AdapterRegistry",
    "adapter_ranks",
    "check_adapter_config",
    "inspect_adapter",
    "read_tensor_header",
    "resolve_adapter_path",
]

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# A PEFT LoRA tensor name (without the "base_model.model." prefix): the module it adapts, the
# LoRA part and, for most parts, ".weight" or ".bias".
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector)(?:\.(?P<part>weight|bias))?\Z"
)
_RANK_A = ("lora_A", "lora_embedding_A")  # (r, in, ...): the rank is dimension 0
_RANK_B = ("lora_B", "lora_embedding_B")  # (out, r, ...): the rank is dimension 1


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class AdapterExists(Conflict):
    code = "adapter_exists"


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str
    path: str  # absolute, inside the adapters directory
    version: int
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str | None
    loaded_at: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _refuse(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="path")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_adapter_path(adapters_dir: Path, raw: str) -> Path:
    """``raw`` resolved inside ``adapters_dir``, or InvalidRequest naming why not."""
    if not raw or "\x00" in raw:
        raise InvalidRequest("path must be a directory inside the adapters directory", param="path")
    root = adapters_dir.resolve()
    candidate = Path(raw)
    if ".." in candidate.parts:
        raise InvalidRequest("path must not contain '..'", param="path")
    full = candidate if candidate.is_absolute() else root / candidate
    resolved = full.resolve()  # follows symlinks
    if not _inside(resolved, root):
        raise InvalidRequest(
            f"path {raw!r} is outside the adapters directory {root} (symlinks included)",
            param="path",
        )
    if not resolved.is_dir():
        raise InvalidRequest(f"no adapter directory at {raw!r} in {root}", param="path")
    return resolved


# ---- adapter_config.json --------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


# Optional fields PEFT reads when it builds the adapter: what each must be when present.
_OPTIONAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (
        lambda v: (isinstance(v, str) and bool(v)) or (_is_str_list(v) and bool(v)),
        "a module name pattern or a non-empty list of module names",
    ),
    "modules_to_save": (_is_str_list, "a list of module names"),
    "layers_to_transform": (
        lambda v: _is_int(v) or (isinstance(v, list) and all(_is_int(i) for i in v)),
        "a layer index or a list of them",
    ),
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(_is_int(r) and r > 0 for r in v.values()),
        "an object of positive integer ranks",
    ),
    "alpha_pattern": (
        lambda v: isinstance(v, dict) and all(_is_number(a) for a in v.values()),
        "an object of numbers",
    ),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a string"),
}


def check_adapter_config(config: Any, where: str) -> dict[str, Any]:
    """``config`` if it is a LoRA config PEFT can build an adapter from, else InvalidRequest
    naming the field (``where`` names the file in messages)."""
    if not isinstance(config, dict):
        raise _refuse(f"{where} must be a JSON object, not {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise _refuse(f"only LoRA adapters are served ({where} has peft_type {peft_type!r})")
    r = config.get("r")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise _refuse(f"{where}: r must be a positive integer, got {json.dumps(r)}")
    for key, (valid, what) in _OPTIONAL.items():
        value = config.get(key)
        if value is not None and not valid(value):
            raise _refuse(f"{where}: {key} must be {what}, got {json.dumps(value)[:100]}")
    return dict(config)


def adapter_ranks(config: dict[str, Any]) -> set[int]:
    """The LoRA ranks a (checked) config allows: ``r`` and those of ``rank_pattern``."""
    return {int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())}


# ---- adapter_model.safetensors --------------------------------------------------------------


def read_tensor_header(file: Path, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors header; no tensor is read."""
    try:
        with safe_open(str(file), framework="pt") as f:
            header = {}
            names = f.keys()
            for key in names:
                part = f.get_slice(key)
                header[key] = (str(part.get_dtype()), tuple(int(d) for d in part.get_shape()))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _refuse(f"{where} is not a valid safetensors file: {exc}") from exc
    return header


def _check_lora_tensors(
    header: dict[str, tuple[str, tuple[int, ...]]], config: dict[str, Any], where: str
) -> None:
    """Float tensors, complete lora_A/lora_B pairs, each of a rank the config allows."""
    ranks = adapter_ranks(config)
    pairs: dict[str, dict[str, int]] = {}
    for key, (dtype, shape) in header.items():
        if dtype not in FLOAT_DTYPES:
            raise _refuse(f"{where}: tensor {key} has dtype {dtype}; adapter weights are floats")
        match = LORA_KEY.match(key)
        if match is None or match["kind"] not in _RANK_A + _RANK_B or match["part"] == "bias":
            continue
        if len(shape) < 2:
            raise _refuse(f"{where}: tensor {key} has shape {list(shape)}, not a LoRA matrix")
        side = "A" if match["kind"] in _RANK_A else "B"
        rank = shape[0] if side == "A" else shape[1]
        if rank not in ranks:
            raise _refuse(
                f"{where}: tensor {key} has rank {rank} but {CONFIG_FILE} says r="
                f"{'/'.join(str(r) for r in sorted(ranks))}"
            )
        pairs.setdefault(match["module"], {})[side] = rank
    if not pairs:
        raise _refuse(f"{where} holds no LoRA weights (lora_A / lora_B tensors)")
    for module, sides in pairs.items():
        if set(sides) != {"A", "B"}:
            missing = ({"A", "B"} - set(sides)).pop()
            raise _refuse(f"{where}: module {module} has no lora_{missing} tensor")
        if sides["A"] != sides["B"]:
            raise _refuse(
                f"{where}: module {module} has lora_A of rank {sides['A']} "
                f"and lora_B of rank {sides['B']}"
            )


# ---- the adapter directory ------------------------------------------------------------------


def _adapter_file(path: Path, root: Path, name: str) -> Path:
    """``path/name`` resolved, refused unless it is a regular file inside ``root``."""
    resolved = (path / name).resolve()
    if not _inside(resolved, root):
        raise _refuse(
            f"{path.name}/{name} is a symlink leading outside the adapters directory {root}"
        )
    if not resolved.is_file():
        raise _refuse(f"{path.name}/{name} is not a regular file")
    return resolved


def inspect_adapter(
    path: Path, adapters_dir: Path, *, max_rank: int | None = None
) -> dict[str, Any]:
    """The adapter's config after the safety checks, before any backend sees it: every file
    in ``path`` resolves inside ``adapters_dir``, safetensors only, a valid LoRA config within
    ``max_rank``, a safetensors header that fits the config."""
    root = adapters_dir.resolve()
    for entry in path.iterdir():
        if entry.is_symlink() and not _inside(entry.resolve(), root):
            raise _refuse(
                f"{path.name}/{entry.name} is a symlink leading outside the adapters "
                f"directory {root}"
            )
    if (path / "adapter_model.bin").exists() and not (path / WEIGHTS_FILE).exists():
        raise _refuse(
            "adapter_model.bin is refused (loading it would unpickle "
            "arbitrary code); save the adapter as safetensors"
        )
    if not (path / WEIGHTS_FILE).exists():
        raise _refuse(f"{path.name} has no {WEIGHTS_FILE}")
    if not (path / CONFIG_FILE).exists():
        raise _refuse(f"{path.name} has no {CONFIG_FILE}")
    config_file = _adapter_file(path, root, CONFIG_FILE)
    weights_file = _adapter_file(path, root, WEIGHTS_FILE)
    where = f"{path.name}/{CONFIG_FILE}"
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise _refuse(f"{where} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _refuse(f"{where} is not readable JSON") from exc
    config = check_adapter_config(raw, where)
    rank = max(adapter_ranks(config))
    if max_rank is not None and rank > max_rank:
        raise _refuse(
            f"adapter rank {rank} is above RAG_MAX_LORA_RANK ({max_rank}); raise it (an "
            f"upstream vLLM needs --max-lora-rank >= {rank} as well) or train with a smaller "
            "--lora-r"
        )
    header = read_tensor_header(weights_file, f"{path.name}/{WEIGHTS_FILE}")
    _check_lora_tensors(header, config, f"{path.name}/{WEIGHTS_FILE}")
    return config


class AdapterRegistry:
    """Loaded adapters by name, persisted as JSON (atomic rewrite on every change)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._items: dict[str, AdapterInfo] = {}
        self._versions: dict[str, int] = {}
        if path.exists():
            raw = json.loads(path.read_text())
            for item in raw.get("adapters", []):
                info = AdapterInfo(**item)
                self._items[info.name] = info
            self._versions = {k: int(v) for k, v in raw.get("versions", {}).items()}

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(
            json.dumps(
                {
                    "adapters": [i.to_dict() for i in self._items.values()],
                    "versions": self._versions,
                },
                indent=2,
            )
        )
        os.replace(tmp, self.path)

    def list(self) -> list[AdapterInfo]:
        return sorted(self._items.values(), key=lambda i: i.name)

    def get(self, name: str) -> AdapterInfo:
        info = self._items.get(name)
        if info is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded", param="name")
        return info

    def find(self, name: str) -> AdapterInfo | None:
        return self._items.get(name)

    def next_info(self, name: str, path: Path, config: dict[str, Any]) -> AdapterInfo:
        if not NAME.match(name):
            raise InvalidRequest("name must be 1-64 letters, digits, '_', '.', '-'", param="name")
        if name in self._items:
            raise AdapterExists(
                f"adapter {name!r} is already loaded; unload it first", param="name"
            )
        targets = config.get("target_modules") or []
        if isinstance(targets, str):
            targets = [targets]
        return AdapterInfo(
            name=name,
            path=str(path),
            version=self._versions.get(name, 0) + 1,
            rank=int(config["r"]),
            alpha=config.get("lora_alpha", 8),  # PEFT's default
            target_modules=sorted(targets),
            base_model=config.get("base_model_name_or_path"),
            loaded_at=int(time.time()),
        )

    def add(self, info: AdapterInfo) -> None:
        with self._lock:
            self._items[info.name] = info
            self._versions[info.name] = info.version
            self._save()

    def remove(self, name: str) -> AdapterInfo:
        with self._lock:
            info = self.get(name)
            del self._items[name]
            self._save()
            return info


class AdapterManager:
    """Loads and unloads adapters on the generation backend, keeping the registry the truth.

    Unloading removes the name at once (new requests get 404) and waits for the requests
    already using it before the backend drops the weights.
    """

    def __init__(
        self,
        adapters_dir: Path,
        registry: AdapterRegistry,
        backend: AdapterBackend,
        *,
        max_rank: int | None = None,
        drain_timeout_s: float = 120.0,
        shared: AdapterStore | None = None,
    ) -> None:
        self.adapters_dir = adapters_dir
        self.registry = registry
        self.backend = backend
        self.max_rank = max_rank
        self.drain_timeout_s = drain_timeout_s
        # With a shared store (the postgres engine), the database says which adapters every
        # replica serves: loads and unloads are written there, and each replica follows it.
        self.shared = shared
        self._shared_versions: dict[str, int] = {}  # name -> shared version loaded here
        self._lock = asyncio.Lock()  # loads and unloads, one at a time
        self._inflight: dict[str, int] = {}  # name -> requests using it now
        self._idle: dict[str, asyncio.Event] = {}  # set when an unloading name's last one ends

    async def restore(self, *, scan: bool) -> list[str]:
        """Load the registered adapters again (and, with ``scan``, every adapter directory
        found in the adapters directory). Returns the names loaded."""
        loaded = []
        for info in self.registry.list():
            try:
                self._inspect(resolve_adapter_path(self.adapters_dir, info.path))
                await self.backend.load_adapter(info.name, info.path, info.version)
                loaded.append(info.name)
            except Exception as exc:  # a broken adapter must not stop the service
                log.error("adapter %r from %s could not be restored: %s", info.name, info.path, exc)
                self.registry.remove(info.name)
        if scan and self.adapters_dir.is_dir():
            for child in sorted(self.adapters_dir.iterdir()):
                if (
                    (child / "adapter_config.json").exists()
                    and NAME.match(child.name)
                    and (self.registry.find(child.name) is None)
                ):
                    try:
                        await self.load(child.name, child.name)
                        loaded.append(child.name)
                    except Exception as exc:
                        log.error("adapter %s not loaded: %s", child, exc)
        return loaded

    def _inspect(self, path: Path) -> dict[str, Any]:
        """Every check that needs no model change: files, config, rank, tensor header, and
        the backend's own (target modules the served model has)."""
        config = inspect_adapter(path, self.adapters_dir, max_rank=self.max_rank)
        self.backend.check_adapter(config)
        return config

    async def load(self, name: str, raw_path: str, *, share: bool = True) -> AdapterInfo:
        path = resolve_adapter_path(self.adapters_dir, raw_path)
        config = await asyncio.to_thread(self._inspect, path)
        async with self._lock:
            info = self.registry.next_info(name, path, config)
            await self.backend.load_adapter(info.name, info.path, info.version)
            self.registry.add(info)
            if self.shared is not None and share:
                try:
                    record = await self.shared.adapters_put(
                        name,
                        str(path.relative_to(self.adapters_dir.resolve())),
                        rank=info.rank,
                        alpha=float(info.alpha),
                    )
                except BaseException:  # not shared, not served: every replica agrees
                    self.registry.remove(name)
                    await self.backend.unload_adapter(info.name, info.version)
                    raise
                self._shared_versions[name] = int(record.version)
        return info

    async def unload(self, name: str, *, share: bool = True) -> AdapterInfo:
        async with self._lock:
            self.registry.get(name)  # 404 before anything changes
            if self.shared is not None and share:
                await self.shared.adapters_delete(name)
            self._shared_versions.pop(name, None)
            info = self.registry.remove(name)
            if self._inflight.get(name):
                idle = self._idle.setdefault(name, asyncio.Event())
                idle.clear()
                # After the timeout, unload anyway: a stuck request must not pin weights.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(idle.wait(), self.drain_timeout_s)
            await self.backend.unload_adapter(info.name, info.version)
        return info

    async def follow_shared(self) -> list[str]:
        """One pass of following the shared store: load what it lists and this replica does
        not serve (or serves in an older version), unload what it no longer lists. Returns
        what changed, as ``+name`` / ``-name``."""
        if self.shared is None:
            return []
        wanted = {r.name: r for r in await self.shared.adapters_list()}
        changed = []
        for name in [n for n in list(self._shared_versions) if n not in wanted]:
            with contextlib.suppress(AdapterNotFound):
                await self.unload(name, share=False)
                changed.append(f"-{name}")
        for name, record in wanted.items():
            if self._shared_versions.get(name) == record.version:
                continue
            try:
                if self.registry.find(name) is not None:
                    await self.unload(name, share=False)
                await self.load(name, record.path, share=False)
                self._shared_versions[name] = int(record.version)
                changed.append(f"+{name}")
            except Exception as exc:  # one adapter this replica cannot load stops nothing
                log.error("shared adapter %r from %s not loaded here: %s", name, record.path, exc)
                self._shared_versions[name] = int(record.version)  # not retried every pass
        return changed

    async def run_follow(self, interval_s: float = 2.0) -> None:
        """Follow the shared store for as long as the service runs."""
        while True:
            try:
                changed = await self.follow_shared()
                if changed:
                    log.info("adapters following the database: %s", ", ".join(changed))
            except Exception as exc:  # the database may be away; the next pass retries
                log.warning("adapters could not follow the database: %s", exc)
            await asyncio.sleep(interval_s)

    # ---- a chat request's use of an adapter ---------------------------------------------
    def serves(self, model: str) -> bool:
        """Whether ``model`` names a loaded adapter (it is then asked for by that name)."""
        return self.registry.find(model) is not None

    async def acquire(self, name: str) -> str:
        """Hold adapter ``name`` for one request (an unload waits until :meth:`release`) and
        return the ``model`` to send the backend for it. AdapterNotFound if it was unloaded
        since :meth:`serves`; a backend that cannot serve it raises, holding nothing."""
        info = self.registry.get(name)
        self._inflight[name] = self._inflight.get(name, 0) + 1
        try:
            return await self.backend.adapter_model(info.name, info.version)
        except BaseException:
            self.release(name)
            raise

    def release(self, name: str) -> None:
        left = self._inflight.get(name, 1) - 1
        self._inflight[name] = left
        if left <= 0:
            self._inflight.pop(name, None)
            idle = self._idle.get(name)
            if idle is not None:
                idle.set()
