"""FAISS vector index: one per collection, ids = chunk row ids (``IndexIDMap2``).

* ``Flat`` (default): exact inner product on normalised vectors (= cosine similarity).
* any other ``index_factory`` string, e.g. ``HNSW32`` or ``IVF256,Flat``, for large
  collections. Indexes that cannot delete (HNSW) keep tombstones, skipped at search time and
  dropped on the next rebuild; indexes that need training (IVF, PQ) hold vectors in an exact
  index until there are enough to train on, then switch.
* moved to the GPU when faiss reports one (flat indexes; others stay on CPU).

A single query is searched on one OpenMP thread: the service runs many single-query searches
side by side, each on its own worker thread, and waking a thread team for one query costs more
than it saves while the embedding model holds the cores (measured right after an encode on two
cores: 200 vectors 0.40 -> 0.12 ms, 10k 3.1 -> 1.8 ms, 100k 23 -> 19 ms). Batches of queries
and index builds keep every thread.

Not thread-safe: the caller serialises writers against readers (see ``rag_service.knowledge``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexes.protocol import IndexMeta, IndexMismatchError

__all__ = [
    "FaissIndex",
    "SnapshotCorrupt",
    "max_snapshot_bytes",
    "validate_factory",
    "write_snapshot",
]

log = logging.getLogger(__name__)

_TRAIN_POINTS_PER_LIST = 39


@contextlib.contextmanager
def _omp_threads(n: int | None) -> Iterator[None]:
    """OpenMP threads for FAISS calls made by this thread (the setting is per thread)."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


MAX_HNSW_M = 128
MAX_PQ_BITS = 12
_ENCODING = re.compile(r"Flat|SQ8|SQ4|SQfp16|PQ(?P<m>[0-9]{1,4})(?:x(?P<bits>[0-9]{1,2}))?")
_FACTORY = re.compile(
    r"Flat"
    r"|HNSW(?P<hnsw>[0-9]{1,4})(?:[,_](?P<hnsw_enc>[A-Za-z0-9]+))?"
    r"|IVF(?P<nlist>[0-9]{1,9})(?:_HNSW(?P<coarse>[0-9]{1,4}))?,(?P<ivf_enc>[A-Za-z0-9]+)"
    r"|(?P<plain_enc>SQ8|SQ4|SQfp16|PQ[0-9]{1,4}(?:x[0-9]{1,2})?)"
)


def validate_factory(factory: str, dimension: int, *, max_nlist: int = 65536) -> None:
    """Raise ValueError (saying what is allowed) unless ``factory`` is a bounded index.

    The grammar is a closed list of families, so no string can make FAISS allocate without
    bound: ``Flat``; ``HNSW<M>[,Flat|SQ8|SQ4|SQfp16|PQ<m>[x<bits>]]`` with M <= 128;
    ``IVF<nlist>[_HNSW<M>],<encoding>`` with nlist <= ``max_nlist``; ``SQ8``/``SQ4``/``SQfp16``;
    ``PQ<m>[x<bits>]`` with m dividing the dimension and bits <= 12. Nothing is built here.
    """
    allowed = (
        "index must be one of Flat, HNSW<M>[,<encoding>], IVF<nlist>[_HNSW<M>],<encoding>, "
        "SQ8, SQ4, SQfp16, PQ<m>[x<bits>] (encoding: Flat, SQ8, SQ4, SQfp16, PQ<m>[x<bits>])"
    )
    match = _FACTORY.fullmatch(factory)
    if match is None:
        raise ValueError(f"{allowed}; got {factory[:64]!r}")

    def check_m(text: str | None) -> None:
        if text is not None and not 4 <= int(text) <= MAX_HNSW_M:
            raise ValueError(f"HNSW M must be between 4 and {MAX_HNSW_M}, got {text}")

    def check_encoding(text: str | None) -> None:
        if text is None:
            return
        enc = _ENCODING.fullmatch(text)
        if enc is None:
            raise ValueError(f"{allowed}; got encoding {text!r}")
        if enc["m"] is not None:
            m = int(enc["m"])
            if m < 1 or dimension % m:
                raise ValueError(f"PQ{m}: m must divide the dimension {dimension}")
            bits = int(enc["bits"] or 8)
            if not 1 <= bits <= MAX_PQ_BITS:
                raise ValueError(f"PQ bits must be between 1 and {MAX_PQ_BITS}, got {bits}")

    check_m(match["hnsw"])
    check_m(match["coarse"])
    check_encoding(match["hnsw_enc"] or match["ivf_enc"] or match["plain_enc"])
    if match["nlist"] is not None and not 1 <= int(match["nlist"]) <= max_nlist:
        raise ValueError(
            f"IVF nlist must be between 1 and {max_nlist} (RAG_MAX_IVF_NLIST), "
            f"got {int(match['nlist'])}"
        )


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def _gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


class FaissIndex:
    """A :class:`~indexes.protocol.VectorIndex` backed by FAISS."""

    def __init__(
        self,
        meta: IndexMeta,
        *,
        ef_search: int = 64,
        nprobe: int = 16,
        use_gpu: bool | None = None,
        _index: Any = None,
    ) -> None:
        self.meta = meta
        self.ef_search = ef_search
        self.nprobe = nprobe
        self._tombstones: set[int] = set()
        self._gpu = (_gpu_count() > 0) if use_gpu is None else use_gpu
        self._gpu_res: Any = None
        self._main: Any = _index if _index is not None else self._new_main()
        # Exact staging index for factories that need training before they accept vectors.
        self._staging: Any = None
        if not self._main.is_trained:
            self._staging = faiss.IndexIDMap2(faiss.IndexFlatIP(meta.dimension))
        self._maybe_to_gpu()

    # ---- construction ----------------------------------------------------------------
    def _new_main(self) -> Any:
        base = faiss.index_factory(
            self.meta.dimension, self.meta.factory, faiss.METRIC_INNER_PRODUCT
        )
        return faiss.IndexIDMap2(base)

    @property
    def _main(self) -> Any:
        return self._main_index

    @_main.setter
    def _main(self, index: Any) -> None:
        # The downcast inner index is looked up once per main index, not on every search.
        self._main_index = index
        self._inner_index = faiss.downcast_index(index.index)

    @property
    def _inner(self) -> Any:
        return self._inner_index

    @property
    def supports_remove(self) -> bool:
        return not isinstance(self._inner, faiss.IndexHNSW)

    @property
    def train_threshold(self) -> int:
        nlist = getattr(self._inner, "nlist", 0) or 256
        return max(_TRAIN_POINTS_PER_LIST * int(nlist), 1000)

    @property
    def on_gpu(self) -> bool:
        return self._gpu_res is not None

    def _maybe_to_gpu(self) -> None:
        if not self._gpu or not isinstance(self._inner, faiss.IndexFlat):
            return
        try:
            self._gpu_res = faiss.StandardGpuResources()
            gpu_inner = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._inner)
            ids = faiss.vector_to_array(self._main.id_map).copy()
            main = faiss.IndexIDMap2(gpu_inner)
            if len(ids):
                # Re-attach the id map of the CPU index to the GPU copy.
                faiss.copy_array_to_vector(ids, main.id_map)
                main.ntotal = len(ids)
                main.construct_rev_map()
            self._main = main
        except (AttributeError, RuntimeError) as exc:  # faiss-cpu, or GPU out of memory
            log.warning("FAISS GPU unavailable, staying on CPU: %s", exc)
            self._gpu_res = None

    # ---- protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        staged = self._staging.ntotal if self._staging is not None else 0
        return int(self._main.ntotal) + int(staged) - len(self._tombstones)

    def ids(self) -> np.ndarray:
        parts = [faiss.vector_to_array(self._main.id_map)]
        if self._staging is not None:
            parts.append(faiss.vector_to_array(self._staging.id_map))
        ids = np.concatenate(parts).astype(np.int64)
        if self._tombstones:
            ids = ids[~np.isin(ids, np.fromiter(self._tombstones, dtype=np.int64))]
        return ids

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.meta.dimension):
            raise ValueError(f"vectors must have shape ({len(ids)}, {self.meta.dimension})")
        if self._tombstones:
            revived = self._tombstones.intersection(ids.tolist())
            if revived:  # cannot happen with row ids, but never resurrect stale vectors
                raise ValueError(f"ids {sorted(revived)[:5]} are tombstoned; rebuild first")
        if self._staging is not None:
            self._staging.add_with_ids(vectors, ids)
            if self._staging.ntotal >= self.train_threshold:
                self._train_from_staging()
            return
        self._main.add_with_ids(vectors, ids)

    def _train_from_staging(self) -> None:
        staged_ids = faiss.vector_to_array(self._staging.id_map).astype(np.int64)
        vectors = self._staging.index.reconstruct_n(0, self._staging.ntotal)
        log.info("training %s on %d vectors", self.meta.factory, len(vectors))
        self._inner.train(vectors)
        self._main.add_with_ids(vectors, staged_ids)
        self._staging = None

    def remove(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self._staging is not None:
            self._staging.remove_ids(faiss.IDSelectorBatch(ids))
        if self.supports_remove:
            self._main.remove_ids(faiss.IDSelectorBatch(ids))
        else:
            present = np.isin(ids, faiss.vector_to_array(self._main.id_map))
            self._tombstones.update(ids[present].tolist())

    @property
    def staged(self) -> bool:
        """True while vectors wait in the exact staging index for enough to train on."""
        return self._staging is not None

    @property
    def tombstones(self) -> int:
        return len(self._tombstones)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with _omp_threads(1 if len(queries) == 1 else None):
            if self._staging is not None:
                return self._search_one(self._staging, queries, k, allowed, exact=True)
            return self._search_one(self._main, queries, k, allowed, exact=False)

    def _params(self, selector: Any, exact: bool) -> Any:
        inner = self._inner
        if not exact and isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                sel=selector, efSearch=max(self.ef_search, 16)
            )
        if not exact and isinstance(inner, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)  # type: ignore[call-arg]
        return faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]

    def _search_one(
        self, index: Any, queries: np.ndarray, k: int, allowed: np.ndarray | None, *, exact: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        ntotal = int(index.ntotal)
        if ntotal == 0 or k <= 0:
            return _empty(len(queries), k)
        selector: Any = None
        keep: list[Any] = []  # selectors must outlive the search call
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            if self._tombstones:
                allowed = allowed[~np.isin(allowed, np.fromiter(self._tombstones, np.int64))]
            if len(allowed) == 0:
                return _empty(len(queries), k)
            selector = faiss.IDSelectorBatch(allowed)
            keep.append(selector)
        elif self._tombstones:
            batch = faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64))
            selector = faiss.IDSelectorNot(batch)
            keep += [batch, selector]
        kk = min(k, ntotal)
        inner = self._inner
        if self.on_gpu and index is self._main:
            scores, ids = self._gpu_search(queries, kk, allowed)
        elif selector is None:
            if not exact and isinstance(inner, faiss.IndexHNSW):
                inner.hnsw.efSearch = max(self.ef_search, kk)
            elif not exact and isinstance(inner, faiss.IndexIVF):
                inner.nprobe = self.nprobe
            scores, ids = index.search(queries, kk)
        else:
            scores, ids = index.search(queries, kk, params=self._params(selector, exact))
        if kk < k:
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        missing = ids < 0
        if missing.any():
            scores[missing] = -np.inf
        return scores, ids

    def _gpu_search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """GPU flat search; filters by over-fetching until k allowed ids are found."""
        if allowed is None:
            return self._main.search(queries, k)
        allowed_set = np.asarray(allowed, np.int64)
        fetch = min(max(4 * k, 64), int(self._main.ntotal))
        while True:
            scores, ids = self._main.search(queries, fetch)
            mask = np.isin(ids, allowed_set)
            enough = (mask.sum(axis=1) >= min(k, len(allowed_set))).all()
            if enough or fetch >= self._main.ntotal:
                out_s = np.full((len(queries), k), -np.inf, np.float32)
                out_i = np.full((len(queries), k), -1, np.int64)
                for q in range(len(queries)):
                    sel_ids, sel_s = ids[q][mask[q]][:k], scores[q][mask[q]][:k]
                    out_i[q, : len(sel_ids)] = sel_ids
                    out_s[q, : len(sel_s)] = sel_s
                return out_s, out_i
            fetch = min(fetch * 4, int(self._main.ntotal))

    # ---- persistence -----------------------------------------------------------------
    def _cpu_main(self) -> Any:
        if not self.on_gpu:
            return self._main
        cpu = faiss.IndexIDMap2(faiss.index_gpu_to_cpu(self._inner))
        ids = faiss.vector_to_array(self._main.id_map)
        faiss.copy_array_to_vector(ids, cpu.id_map)
        cpu.ntotal = len(ids)
        return cpu

    def serialize(self) -> bytes:
        """Index bytes (staging included); call under the caller's read lock."""
        index = self._staging if self._staging is not None else self._cpu_main()
        return bytes(faiss.serialize_index(index))

    def save(self, path: Path) -> None:
        write_snapshot(path, self.serialize(), self.meta, staged=self._staging is not None)

    @classmethod
    def load(
        cls,
        path: Path,
        meta: IndexMeta,
        *,
        expected_vectors: int | None = None,
        **kwargs: Any,
    ) -> FaissIndex:
        """Load a snapshot; :class:`IndexMismatchError` if it was made by something else,
        :class:`SnapshotCorrupt` (a subclass) if it cannot be trusted.

        Nothing reaches FAISS's reader before the snapshot is checked: the metadata must have
        the exact shape :func:`write_snapshot` gives it, the file must be no larger than
        :func:`max_snapshot_bytes` allows for ``expected_vectors`` (the chunks the store holds;
        None skips that bound) and its bytes must match the recorded SHA-256. A size field
        damaged inside the file would otherwise make FAISS allocate what it says (gigabytes)
        before noticing. What FAISS builds must then be an ``IndexIDMap2`` of this dimension,
        metric and index family.
        """
        staged, digest, size = _read_snapshot_meta(path.with_suffix(".json"), meta, str(path))
        try:
            on_disk = path.stat().st_size
        except OSError as exc:
            raise SnapshotCorrupt(f"snapshot {path} cannot be read: {exc}") from exc
        if on_disk != size:
            raise SnapshotCorrupt(
                f"snapshot {path} holds {on_disk} bytes, its metadata says {size}"
            )
        if expected_vectors is not None:
            limit = max_snapshot_bytes(meta, expected_vectors)
            if size > limit:
                raise SnapshotCorrupt(
                    f"snapshot {path} holds {size} bytes, more than the {limit} that "
                    f"{expected_vectors} vectors of dimension {meta.dimension} "
                    f"({meta.factory}) can take"
                )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SnapshotCorrupt(f"snapshot {path} cannot be read: {exc}") from exc
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise SnapshotCorrupt(f"snapshot {path} is damaged: its checksum does not match")
        try:
            raw = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except Exception as exc:  # FAISS's C++ errors arrive as RuntimeError, MemoryError, ...
            raise SnapshotCorrupt(f"FAISS cannot read snapshot {path}: {exc}") from exc
        del data
        _check_loaded(raw, meta, staged=staged, expected_vectors=expected_vectors, where=path)
        if staged:
            index = cls(meta, **kwargs)
            if index._staging is None:
                raise SnapshotCorrupt(
                    f"snapshot {path} is marked staged, but {meta.factory} needs no training"
                )
            index._staging = raw
            return index
        # The id map's own flag is not updated when its inner index is trained in place;
        # left False, the loaded index would hide its vectors behind a fresh staging index.
        raw.is_trained = True
        return cls(meta, _index=raw, **kwargs)


class SnapshotCorrupt(IndexMismatchError):
    """A snapshot cannot be trusted (damaged, truncated, implausible): rebuild from the store."""


_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_META_BYTES = 64 * 1024


def _read_snapshot_meta(meta_path: Path, meta: IndexMeta, where: str) -> tuple[bool, str, int]:
    """(staged, sha256, size) from a snapshot's metadata, checked against ``meta``."""
    try:
        if meta_path.stat().st_size > _MAX_META_BYTES:
            raise SnapshotCorrupt(f"index metadata {meta_path} is implausibly large")
        stored = json.loads(meta_path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise SnapshotCorrupt(f"index metadata {meta_path} is missing or unreadable") from exc
    if not isinstance(stored, dict) or not isinstance(stored.get("meta"), dict):
        raise SnapshotCorrupt(f"index metadata {meta_path} is not a snapshot description")
    meta.check(stored["meta"], where)
    staged, digest, size = stored.get("staged"), stored.get("sha256"), stored.get("bytes")
    if not isinstance(staged, bool):
        raise SnapshotCorrupt(f"index metadata {meta_path}: 'staged' must be true or false")
    if not isinstance(digest, str) or _SHA256.fullmatch(digest) is None:
        raise SnapshotCorrupt(f"index metadata {meta_path} has no valid 'sha256' checksum")
    if type(size) is not int or size < 0:
        raise SnapshotCorrupt(f"index metadata {meta_path}: 'bytes' must be a size in bytes")
    return staged, digest, size


def max_snapshot_bytes(meta: IndexMeta, vectors: int) -> int:
    """The largest snapshot a healthy index of ``vectors`` vectors can take on disk.

    Per vector: its id (twice for IVF lists), a code no larger than the float32 vector, and
    for HNSW the graph (levels, offsets, about 2M neighbours, bounded by 12M bytes). Fixed:
    IVF centroids (with their own HNSW graph), PQ codebooks, SQ ranges. The sum is doubled
    (a snapshot may still hold vectors deleted after it was written, or HNSW tombstones) and
    1 MiB added for headers, so no healthy snapshot comes near it.
    """
    d = meta.dimension
    match = _FACTORY.fullmatch(meta.factory)
    groups = match.groupdict() if match is not None else {}
    hnsw = int(groups.get("hnsw") or 0)
    coarse = int(groups.get("coarse") or 0)
    nlist = int(groups.get("nlist") or 0)
    encoding = _ENCODING.fullmatch(
        groups.get("hnsw_enc") or groups.get("ivf_enc") or groups.get("plain_enc") or "Flat"
    )
    pq_bits = int(encoding["bits"] or 8) if encoding is not None and encoding["m"] else 0
    per_vector = 16 + 4 * d + (12 * hnsw + 16 if hnsw else 0)
    fixed = nlist * (4 * d + 12 * coarse + 64) + 8 * d + (4 * d * 2**pq_bits if pq_bits else 0)
    if match is None:  # not a family this service builds: bound it as the largest one
        per_vector += 12 * MAX_HNSW_M + 16
        fixed += 4 * d * 2**MAX_PQ_BITS
    return 2 * (fixed + max(vectors, 0) * per_vector) + 2**20


def _check_loaded(
    raw: Any, meta: IndexMeta, *, staged: bool, expected_vectors: int | None, where: Path
) -> None:
    """Refuse an index that FAISS read but this collection cannot use."""
    outer = faiss.downcast_index(raw)
    if not isinstance(outer, faiss.IndexIDMap2):
        raise SnapshotCorrupt(f"snapshot {where} holds a {type(outer).__name__}, not an IDMap2")
    inner = faiss.downcast_index(outer.index)
    if staged:
        family: Any = faiss.IndexFlat
    else:
        family = type(faiss.downcast_index(faiss.index_factory(meta.dimension, meta.factory)))
    problems = []
    if outer.d != meta.dimension or inner.d != meta.dimension:
        problems.append(f"dimension {inner.d}, expected {meta.dimension}")
    if outer.metric_type != faiss.METRIC_INNER_PRODUCT or inner.metric_type != outer.metric_type:
        problems.append(f"metric {inner.metric_type}, expected inner product")
    if not isinstance(inner, family):
        problems.append(f"a {type(inner).__name__}, expected a {family.__name__}")
    elif not staged and not inner.is_trained:
        problems.append("an untrained index")
    if outer.ntotal != inner.ntotal:
        problems.append(f"{outer.ntotal} ids for {inner.ntotal} vectors")
    if expected_vectors is not None and outer.ntotal > 2 * expected_vectors + 1024:
        problems.append(f"{outer.ntotal} vectors where the store holds {expected_vectors}")
    if problems:
        raise SnapshotCorrupt(
            f"snapshot {where} cannot serve this collection: " + "; ".join(problems)
        )


def write_snapshot(path: Path, data: bytes, meta: IndexMeta, *, staged: bool) -> None:
    """Write index bytes and their metadata atomically (temp file, fsync, rename).

    The metadata records the size and SHA-256 of the bytes, so a damaged file, or index bytes
    and metadata from two different rounds (a crash between the renames), are refused on load.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    described = {
        "meta": meta.to_dict(),
        "staged": staged,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    for target, payload in (
        (path, data),
        (path.with_suffix(".json"), json.dumps(described).encode()),
    ):
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
