"""The fusion of a dense and a BM25 ranking, checked by hand."""

from __future__ import annotations

import pytest

from indexes.stopwords import content_words
from indexes.types import RRF_K, fuse

DENSE = [(1, 0.9), (2, 0.7), (3, 0.5)]
SPARSE = [(3, 12.0), (4, 6.0), (1, 2.0)]


def test_convex_by_hand():
    ranked, parts = fuse(DENSE, SPARSE, alpha=0.5)
    # dense normalised: 1 -> 1.0, 2 -> 0.5, 3 -> 0.0; bm25 normalised: 3 -> 1.0, 4 -> 0.4, 1 -> 0.0
    want = {1: 0.5, 2: 0.25, 3: 0.5, 4: 0.2}
    assert dict(ranked) == pytest.approx(want)
    assert [cid for cid, _ in ranked] == [1, 3, 2, 4]  # 1 and 3 tie: the dense order decides
    assert parts[3] == pytest.approx({"dense": 0.5, "bm25": 12.0, "fused": 0.5})
    assert parts[2] == pytest.approx({"dense": 0.7, "fused": 0.25})
    ranked, _ = fuse(DENSE, SPARSE, alpha=0.8)
    assert dict(ranked) == pytest.approx({1: 0.8, 2: 0.4, 3: 0.2, 4: 0.08})


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
    assert dict(ranked) == pytest.approx({7: 0.5, 8: 0.5, 9: 0.5})
    assert ranked[0][0] == 7


def test_content_words():
    assert content_words(["what", "is", "the", "zebra", "doing", "in", "the", "zoo", "zebra"]) == [
        "zebra",
        "zoo",
    ]
    assert content_words(["how", "do", "i"]) == []
