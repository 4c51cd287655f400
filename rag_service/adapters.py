"""Fine-tuned adapters in the running service: path checks, a persistent registry.

An adapter is a PEFT LoRA directory made by ``rag-train`` (``adapter_config.json`` +
``adapter_model.safetensors``). Paths are resolved inside ``RAG_ADAPTERS_DIR``: absolute paths
outside it, ``..`` and symlinks leading out are refused, and so are pickled weights
(``adapter_model.bin``). The registry (``<data_dir>/adapters.json``) is the truth about what is
loaded; a restart loads the same adapters again. Every load of a name gets a new version, so a
backend that caches by name (vLLM) sees ``name@version`` and never serves stale weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rag_service.errors import Conflict, InvalidRequest, NotFound

__all__ = [
    "AdapterInfo",
    "AdapterManager",
    "AdapterRegistry",
    "inspect_adapter",
    "resolve_adapter_path",
]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    alpha: int
    target_modules: list[str]
    base_model: str | None
    loaded_at: int

    @property
    def upstream_name(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    if resolved != root and root not in resolved.parents:
        raise InvalidRequest(
            f"path {raw!r} is outside the adapters directory {root} (symlinks included)",
            param="path",
        )
    if not resolved.is_dir():
        raise InvalidRequest(f"no adapter directory at {raw!r} in {root}", param="path")
    return resolved


def inspect_adapter(path: Path) -> dict[str, Any]:
    """The adapter's config after the safety checks (safetensors only, LoRA only)."""
    if (path / "adapter_model.bin").exists() and not (path / "adapter_model.safetensors").exists():
        raise InvalidRequest(
            "adapter_model.bin is refused (loading it would unpickle "
            "arbitrary code); save the adapter as safetensors",
            param="path",
        )
    if not (path / "adapter_model.safetensors").exists():
        raise InvalidRequest(f"{path.name} has no adapter_model.safetensors", param="path")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(
            f"{path.name}/adapter_config.json is missing or not JSON", param="path"
        ) from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidRequest(
            f"only LoRA adapters are served (got {config.get('peft_type')})", param="path"
        )
    return dict(config)


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
            rank=int(config.get("r", 0)),
            alpha=int(config.get("lora_alpha", 0)),
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
        backend: Any,
        *,
        max_rank: int | None = None,
        drain_timeout_s: float = 120.0,
    ) -> None:
        self.adapters_dir = adapters_dir
        self.registry = registry
        self.backend = backend
        self.max_rank = max_rank
        self.drain_timeout_s = drain_timeout_s
        self._lock: Any = None
        self._inflight: dict[str, int] = {}
        self._idle: dict[str, Any] = {}

    def _mutex(self) -> Any:
        import asyncio

        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def supported(self) -> bool:
        return hasattr(self.backend, "load_adapter")

    async def restore(self, *, scan: bool) -> list[str]:
        """Load the registered adapters again (and, with ``scan``, every adapter directory
        found in the adapters directory). Returns the names loaded."""
        import logging

        log = logging.getLogger(__name__)
        loaded = []
        for info in self.registry.list():
            try:
                inspect_adapter(Path(info.path))
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

    async def load(self, name: str, raw_path: str) -> AdapterInfo:
        path = resolve_adapter_path(self.adapters_dir, raw_path)
        config = inspect_adapter(path)
        rank = int(config.get("r", 0))
        if self.max_rank is not None and rank > self.max_rank:
            raise InvalidRequest(
                f"adapter rank {rank} is above what the upstream server accepts "
                f"({self.max_rank}); start vLLM with --max-lora-rank >= {rank} and set "
                "RAG_UPSTREAM_MAX_LORA_RANK, or train with a smaller --lora-r",
                param="path",
            )
        self.backend.check_adapter(config)
        async with self._mutex():
            info = self.registry.next_info(name, path, config)
            await self.backend.load_adapter(info.name, info.path, info.version)
            self.registry.add(info)
        return info

    async def unload(self, name: str) -> AdapterInfo:
        import asyncio

        async with self._mutex():
            info = self.registry.remove(name)
            if self._inflight.get(name):
                idle = self._idle.setdefault(name, asyncio.Event())
                idle.clear()
                # After the timeout, unload anyway: a stuck request must not pin weights.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(idle.wait(), self.drain_timeout_s)
            await self.backend.unload_adapter(info.name, info.version)
        return info

    def acquire(self, name: str) -> AdapterInfo:
        info = self.registry.get(name)
        self._inflight[name] = self._inflight.get(name, 0) + 1
        return info

    def release(self, name: str) -> None:
        left = self._inflight.get(name, 1) - 1
        self._inflight[name] = left
        if left <= 0:
            self._inflight.pop(name, None)
            idle = self._idle.get(name)
            if idle is not None:
                idle.set()
