"""The fusion of a dense and a BM25 ranking, checked by hand."""

from __future__ import annotations

import pytest

from indexes.stopwords import content_words
from indexes.types import RRF_K, fuse

DENSE = [(1, 0.9), (2, 0.7), (3, 0.5)]
SPARSE = [(3, 12.0), (4, 6.0), (1, 2.0)]


def test_convex_by_hand():
    ranked, parts = fuse(DENSE, SPARSE, alpha=0.5)
    # dense as it is (4, not in the dense ranking, gets its lowest score, 0.5);
    # bm25 over its best (12): 3 -> 1.0, 4 -> 0.5, 1 -> 1/6, 2 -> 0
    want = {1: 0.45 + 0.5 / 6, 2: 0.35, 3: 0.75, 4: 0.5}
    assert dict(ranked) == pytest.approx(want)
    assert [cid for cid, _ in ranked] == [3, 1, 4, 2]
    assert parts[3] == pytest.approx({"dense": 0.5, "bm25": 12.0, "fused": 0.75})
    assert parts[2] == pytest.approx({"dense": 0.7, "fused": 0.35})
    assert parts[4] == pytest.approx({"bm25": 6.0, "fused": 0.5})
    ranked, _ = fuse(DENSE, SPARSE, alpha=0.8)
    assert dict(ranked) == pytest.approx({1: 0.72 + 0.2 / 6, 2: 0.56, 3: 0.6, 4: 0.5})
    assert [cid for cid, _ in ranked] == [1, 3, 2, 4]


def test_weighted_rrf_by_hand():
    ranked, _ = fuse(DENSE, SPARSE, alpha=0.75, fusion="rrf")
    k = RRF_K
    want = {
        1: 0.75 / (k + 1) + 0.25 / (k + 3),
        2: 0.75 / (k + 2),
        3: 0.75 / (k + 3) + 0.25 / (k + 1),
        4: 0.25 / (k + 2),
    }
    assert dict(ranked) == pytest.approx(want)
    assert [cid for cid, _ in ranked] == sorted(want, key=want.__getitem__, reverse=True)


@pytest.mark.parametrize("fusion", ["convex", "rrf"])
def test_alpha_ends(fusion):
    assert [c for c, _ in fuse(DENSE, SPARSE, alpha=1.0, fusion=fusion)[0]][:3] == [1, 2, 3]
    assert [c for c, _ in fuse(DENSE, SPARSE, alpha=0.0, fusion=fusion)[0]][:3] == [3, 4, 1]


def test_one_sided_and_flat_rankings():
    ranked, parts = fuse(DENSE, [], alpha=0.3)
    assert [c for c, _ in ranked] == [1, 2, 3]
    assert all("bm25" not in p for p in parts.values())
    ranked, _ = fuse([(7, 0.4)], [(8, 3.0), (9, 3.0)], alpha=0.5)
    assert dict(ranked) == pytest.approx({7: 0.2, 8: 0.7, 9: 0.7})
    assert [c for c, _ in ranked] == [8, 9, 7]
    ranked, _ = fuse([(1, 0.3), (2, 0.2)], [(2, 0.0)], alpha=0.5)  # BM25 scores all 0
    assert [c for c, _ in ranked] == [1, 2]


def test_content_words():
    assert content_words(["what", "is", "the", "zebra", "doing", "in", "the", "zoo", "zebra"]) == [
        "zebra",
        "zoo",
    ]
    assert content_words(["how", "do", "i"]) == []
