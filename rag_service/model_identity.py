"""What ``GET /v1/models`` says a model on disk is: its name and a hash of its files.

The path of a model or adapter directory says where the service's files live (a user's home,
a mount), which is nobody's business who holds an API key; the content hash says what a
client needs to know instead: whether two services, or one service before and after a
change, serve the same weights. The hash is sha256 over every file under the directory (its
path relative to the directory, its size and its bytes, in sorted order), computed once per
directory and state (the files' sizes and modification times) and then remembered.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

__all__ = ["content_hash"]

_CACHE: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}
_LOCK = threading.Lock()


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def content_hash(path: str | Path) -> str | None:
    """``sha256:<hex>`` of the files under ``path``, or None when it cannot be read."""
    root = Path(path)
    try:
        files = _files(root)
        state = tuple(
            (p.relative_to(root).as_posix() if p != root else p.name, s.st_size, s.st_mtime_ns)
            for p in files
            for s in (p.stat(),)
        )
    except OSError:
        return None
    key = (str(root.resolve()), state)
    with _LOCK:
        found = _CACHE.get(key)
    if found is not None:
        return found
    digest = hashlib.sha256()
    try:
        for file, (name, size, _) in zip(files, state, strict=True):
            digest.update(f"{name}\0{size}\0".encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return None
    value = f"sha256:{digest.hexdigest()}"
    with _LOCK:
        _CACHE[key] = value
    return value
