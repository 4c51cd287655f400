"""The vector-index protocol every backend implements (FAISS today; others plug in the same way).

An index maps chunk row ids (int64, from the document store) to normalised vectors and answers
top-k inner-product queries, optionally restricted to a set of allowed ids. It is derived state:
the document store can always rebuild it, so snapshots only make restarts fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["INDEX_FORMAT_VERSION", "IndexMeta", "IndexMismatchError", "VectorIndex"]

INDEX_FORMAT_VERSION = 1


class IndexMismatchError(RuntimeError):
    """A stored index was built by something else than what is asked of it."""


@dataclass(frozen=True, slots=True)
class IndexMeta:
    """What made an index; stored beside every snapshot and checked on load."""

    embedding_model: str
    dimension: int
    factory: str = "Flat"
    normalized: bool = True
    metric: str = "inner_product"
    format_version: int = INDEX_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, stored: dict[str, Any], where: str) -> None:
        """Raise :class:`IndexMismatchError` naming every differing field."""
        diffs = [
            f"{key}: stored {stored.get(key)!r}, expected {value!r}"
            for key, value in self.to_dict().items()
            if stored.get(key) != value
        ]
        if diffs:
            raise IndexMismatchError(f"index at {where} does not match: " + "; ".join(diffs))


@runtime_checkable
class VectorIndex(Protocol):
    meta: IndexMeta

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def ids(self) -> np.ndarray: ...

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each of shape (len(queries), k); missing slots have id -1."""
        ...

    def save(self, path: Path) -> None: ...
