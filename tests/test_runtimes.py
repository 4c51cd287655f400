"""Runtimes per lane: measured on the host, probed against PyTorch fp32, cached, shown in
/ready; chunks encoded from their document's token ids.

The session's embedder (``auto``) measured its candidates once for the session (the cache is
the session's ``RAG_CACHE_DIR``); tests that need a fresh measurement work on a copy."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from rag_service.chunking import ChunkingConfig, chunk_offsets
from rag_service.embedding import Embedder, TokenIds
from rag_service.model_cache import cache_dir
from rag_service.runtimes import (
    Measured,
    choose,
    cpu_has_bf16,
    host_key,
    read_timings,
    write_timings,
)
from rag_service.settings import bundled_embedding_model
from tests.support import ROOT

BUNDLED = Path(bundled_embedding_model())


def test_each_lane_takes_the_runtime_that_was_fastest_at_its_work():
    measured = [
        Measured("torch", 48.0, 8.3),
        Measured("onnx", 53.0, 2.7),
        Measured("torch-bf16", 104.0, 11.9),
    ]
    lanes = choose(measured)
    assert lanes["interactive"].runtime == "onnx" and "onnx 2.7 ms" in lanes["interactive"].why
    assert lanes["bulk"].runtime == "torch-bf16" and "torch-bf16 104" in lanes["bulk"].why
    # another CPU, another order: nothing is fixed in code
    lanes = choose([Measured("torch", 70.0, 2.0), Measured("onnx", 40.0, 2.5)])
    assert lanes["interactive"].runtime == lanes["bulk"].runtime == "torch"


def test_timings_are_cached_per_host(tmp_path):
    host = host_key(2)
    measured = [Measured("torch", 10.0, 5.0), Measured("onnx", 20.0, 2.0)]
    write_timings(tmp_path, "embedding-abc", host, measured)
    assert read_timings(tmp_path, "embedding-abc", host, ["onnx", "torch"]) == measured
    # another core count, another candidate set or another model: measured again
    assert read_timings(tmp_path, "embedding-abc", host_key(4), ["onnx", "torch"]) is None
    assert read_timings(tmp_path, "embedding-abc", host, ["onnx", "torch", "torch-bf16"]) is None
    assert read_timings(tmp_path, "embedding-xyz", host, ["onnx", "torch"]) is None
    assert not [p for p in (tmp_path / "runtimes").iterdir() if p.name.startswith(".")]


def test_the_default_measures_its_candidates_and_says_why_each_lane_runs_what(embedder, caplog):
    names = {m.runtime for m in embedder.timings}
    assert {"torch", "onnx"} <= names  # every candidate that passed its probe was timed
    assert ("torch-bf16" in names) == cpu_has_bf16() or "torch-bf16 not used" in (
        embedder.runtime_note
    )
    best_query = min(embedder.timings, key=lambda m: m.query_ms).runtime
    best_bulk = max(embedder.timings, key=lambda m: m.bulk_texts_per_s).runtime
    assert embedder.runtimes == {"interactive": best_query, "bulk": best_bulk}
    for lane in ("interactive", "bulk"):
        assert "measured here" in embedder.lanes[lane].why
    cached = list((cache_dir() / "runtimes").glob("*.json"))
    assert cached and json.loads(cached[0].read_text())["host"]["cores"] == embedder.cores
    with caplog.at_level(logging.INFO, logger="rag_service"):
        again = Embedder(str(BUNDLED), device="cpu")
    assert again.runtimes == embedder.runtimes and again.timings == embedder.timings
    assert "cached" in again.lanes["bulk"].why


def test_vectors_of_the_two_lanes_are_interchangeable(embedder):
    """Chunks embedded on the bulk lane's runtime and queries on the interactive lane's meet
    in one space: the probe's bar holds on real prose."""
    paragraphs = [p for p in (ROOT / "README.md").read_text().split("\n\n") if len(p) > 80]
    texts = paragraphs[:40]
    bulk, interactive = embedder.encode_bulk(texts), embedder.encode(texts)
    assert np.sum(bulk * interactive, axis=1).min() >= 0.9999


@pytest.mark.parametrize("forced", ["torch", "torch-bf16", "onnx"])
def test_a_forced_runtime_runs_both_lanes_without_measuring(forced, embedder, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(cache_dir() / "onnx", root / "onnx")
    one = Embedder(str(BUNDLED), device="cpu", runtime=forced, cache_root=root)
    assert one.runtimes == {"interactive": forced, "bulk": forced}, one.runtime_note
    assert one.timings == [] and not (root / "runtimes").exists()
    if forced != "torch":
        assert one.probes[forced] >= 0.9999  # probed against PyTorch fp32 before serving
    texts = ["How do I reset my password?", "Configure a static address. " * 30]
    np.testing.assert_allclose(one.encode(texts), embedder.encode(texts), atol=1e-2)


def test_ready_shows_each_lane_and_the_timings(client, embedder):
    runtime = client.get("/ready").json()["runtimes"][embedder.name]
    assert runtime["lanes"] == {
        lane: {"runtime": c.runtime, "why": c.why} for lane, c in embedder.lanes.items()
    }
    assert runtime["cores"] == embedder.cores
    assert {t["runtime"] for t in runtime["timings"]} == {m.runtime for m in embedder.timings}


# ---- chunks from their document's token ids ----------------------------------------------------
DOCUMENT = (ROOT / "README.md").read_text()[:6000]


def test_chunk_ids_are_the_ids_of_the_chunk_text(embedder):
    """A chunk's ids, cut from its document's, are exactly what tokenising its text gives
    (special tokens included), so chunks are tokenised once."""
    assert embedder._id_template is not None  # the bundled model takes the fast path
    document = embedder.tokenize_documents([DOCUMENT])[0]
    chunks = chunk_offsets(DOCUMENT, document.offsets, ChunkingConfig(48, 8))
    assert len(chunks) > 20
    for chunk in chunks:
        ids = embedder.chunk_ids(document, chunk.first, chunk.tokens)
        assert isinstance(ids, TokenIds)
        assert list(ids) == embedder._batch_tokenizer.encode(chunk.text).ids
    texts = [c.text for c in chunks]
    items = [embedder.chunk_ids(document, c.first, c.tokens) for c in chunks]
    np.testing.assert_allclose(embedder.encode(items), embedder.encode(texts), atol=1e-6)


def test_a_chunk_cut_inside_a_word_is_tokenised_from_its_text(embedder):
    document = embedder.tokenize_documents(["unbelievably " * 3])[0]
    pieces = [k for k in range(1, len(document.ids)) if not document.word_start(k)]
    assert pieces  # "unbelievably" is several word pieces
    assert embedder.chunk_ids(document, pieces[0], 2) is None


def test_a_tokenizer_that_reads_a_cut_text_differently_turns_the_reuse_off(tmp_path):
    """A byte-level pre-tokenizer marks a word by the space before it: a chunk's first word
    has none when tokenised alone, so its ids differ from the document's and the chunks are
    tokenised from their text (found by the check at load, not assumed)."""
    copy = tmp_path / "model"
    shutil.copytree(BUNDLED, copy)
    spec = json.loads((copy / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "\u2581",
        "prepend_scheme": "never",
        "split": True,
    }
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    other = Embedder(str(copy), device="cpu", runtime="torch")
    assert other._id_template is None
    document = other.tokenize_documents(["several words of a document"])[0]
    assert other.chunk_ids(document, 1, 2) is None
