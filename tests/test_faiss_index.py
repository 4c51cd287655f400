"""Contract tests run against every index type through one parametrised fixture."""

from __future__ import annotations

import numpy as np
import pytest

from indexes.faiss_index import FaissIndex, validate_factory
from indexes.protocol import IndexMeta, IndexMismatchError, VectorIndex

DIM = 32
rng = np.random.default_rng(7)


def unit(n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(params=["Flat", "HNSW32", "IVF4,Flat"])
def index(request) -> FaissIndex:
    return FaissIndex(
        IndexMeta(embedding_model="m", dimension=DIM, factory=request.param), use_gpu=False
    )


def test_is_a_vector_index(index):
    assert isinstance(index, VectorIndex)


def test_add_search_remove(index):
    vecs = unit(300)
    ids = np.arange(1000, 1300, dtype=np.int64)
    index.add(ids, vecs)
    assert len(index) == 300
    scores, got = index.search(vecs[:5], 1)
    assert got[:, 0].tolist() == ids[:5].tolist()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)
    index.remove(ids[:2])
    assert len(index) == 298
    _, got = index.search(vecs[:2], 5)
    assert not set(got.ravel().tolist()) & {1000, 1001}
    assert sorted(index.ids().tolist()) == ids[2:].tolist()


def test_allowed_ids_filter_before_top_k(index):
    vecs = unit(200)
    ids = np.arange(200, dtype=np.int64)
    index.add(ids, vecs)
    allowed = np.array([150, 151, 199], dtype=np.int64)
    _, got = index.search(vecs[:1], 3, allowed)
    assert sorted(got[0].tolist()) == [150, 151, 199]
    _, got = index.search(vecs[:1], 5, allowed)
    assert sorted(got[0][got[0] >= 0].tolist()) == [150, 151, 199]
    assert (got[0] == -1).sum() == 2


def test_empty_index_and_k_larger_than_size(index):
    scores, got = index.search(unit(1), 4)
    assert got.tolist() == [[-1, -1, -1, -1]] and np.isneginf(scores).all()
    index.add(np.array([5, 6], dtype=np.int64), unit(2))
    _, got = index.search(unit(1), 4)
    assert sorted(got[0][:2].tolist()) == [5, 6] and got[0][2:].tolist() == [-1, -1]


def test_save_load_roundtrip_and_mismatch(index, tmp_path):
    vecs = unit(100)
    index.add(np.arange(100, dtype=np.int64), vecs)
    path = tmp_path / "i.faiss"
    index.save(path)
    loaded = FaissIndex.load(path, index.meta, use_gpu=False)
    assert sorted(loaded.ids().tolist()) == list(range(100))
    assert loaded.search(vecs[:3], 2)[1].tolist() == index.search(vecs[:3], 2)[1].tolist()
    other = IndexMeta(embedding_model="other", dimension=DIM, factory=index.meta.factory)
    with pytest.raises(IndexMismatchError, match="embedding_model: stored 'm', expected 'other'"):
        FaissIndex.load(path, other)


def test_ivf_trains_once_enough_vectors():
    idx = FaissIndex(
        IndexMeta(embedding_model="m", dimension=DIM, factory="IVF4,Flat"), use_gpu=False
    )
    vecs = unit(idx.train_threshold + 10)
    idx.add(np.arange(len(vecs) - 20, dtype=np.int64), vecs[:-20])
    assert idx._staging is not None  # still exact, not trained
    idx.add(np.arange(len(vecs) - 20, len(vecs), dtype=np.int64), vecs[-20:])
    assert idx._staging is None and len(idx) == len(vecs)
    _, got = idx.search(vecs[:3], 1)
    assert got[:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("bad", ["", "Nope", "IDMap,Flat", "Flat; rm -rf", "x" * 80])
def test_validate_factory_rejects(bad):
    with pytest.raises(ValueError):
        validate_factory(bad, DIM)


def test_single_query_search_runs_on_one_thread_and_restores_the_setting(index, monkeypatch):
    import faiss

    vecs = unit(300)
    index.add(np.arange(300, dtype=np.int64), vecs)
    seen: list[int] = []
    real_search = type(index)._search_one

    def spy(self, *args, **kwargs):
        seen.append(faiss.omp_get_max_threads())
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(type(index), "_search_one", spy)
    faiss.omp_set_num_threads(2)
    index.search(vecs[:1], 3)
    index.search(vecs[:4], 3)
    assert seen == [1, 2]
    assert faiss.omp_get_max_threads() == 2
