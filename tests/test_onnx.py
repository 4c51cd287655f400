"""The ONNX Runtime encoders: probe, cache, corruption, fallback, pooling, reranker, no-wait.

Everything runs for real: the export (a child process running ``torch.onnx.export``), ONNX
Runtime, the PyTorch reference, the app. The session's cache (``RAG_CACHE_DIR``, set once in
``tests/conftest.py``) holds the bundled model's graph, exported once for the whole session;
tests that damage a cache work on a copy of it in ``tmp_path``."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient

from rag_service.app import create_app
from rag_service.batching import lane_shares
from rag_service.embedding import Embedder
from rag_service.model_cache import cache_dir
from rag_service.onnx_encoder import GRAPH_FILE, META_FILE, graph_entry
from rag_service.reranking import Reranker
from rag_service.settings import Settings, bundled_embedding_model
from tests.support import BASE_URL, ROOT, wait_ready

BUNDLED = Path(bundled_embedding_model())


def real_texts(n: int = 40) -> list[str]:
    """Paragraphs and questions of real prose: the project's README and a benchmark set."""
    paragraphs = [p.strip() for p in (ROOT / "README.md").read_text().split("\n\n")]
    texts = [p for p in paragraphs if len(p) > 40][: n // 2]
    lines = (ROOT / "benchmarks/data/debian_faq_rephrased.jsonl").read_text().splitlines()
    for line in lines[: n - len(texts)]:
        record = json.loads(line)
        texts.append(str(record.get("question") or record.get("text") or line))
    return texts


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def torch_embedder() -> Embedder:
    return Embedder(str(BUNDLED), device="cpu", runtime="torch")


@pytest.fixture(scope="module")
def onnx_embedder(embedder: Embedder) -> Embedder:
    """The bundled model on ONNX Runtime on both lanes (the session's graph, no measuring)."""
    forced = Embedder(str(BUNDLED), device="cpu", runtime="onnx")
    assert forced.runtimes == {"interactive": "onnx", "bulk": "onnx"}, forced.runtime_note
    return forced


@pytest.fixture
def cache_copy(tmp_path: Path, embedder: Embedder) -> tuple[Path, Path]:
    """(cache root, graph entry): a private copy of the session's cached graph."""
    root = tmp_path / "cache"
    entry = graph_entry(BUNDLED, "embedding", cache_root=root)
    shutil.copytree(graph_entry(BUNDLED, "embedding"), entry)
    return root, entry


def test_probe_passes_and_vectors_match_pytorch(onnx_embedder, torch_embedder):
    embedder = onnx_embedder
    assert embedder.probe_cosine is not None and embedder.probe_cosine >= 0.9999
    texts = real_texts()
    tokens = embedder.count_tokens(texts)
    ours = embedder.encode(texts, tokens)
    bulk = embedder.encode_bulk(texts[:10], tokens[:10])
    reference = torch_embedder.encode(texts, tokens)
    assert len(texts) >= 30 and cosines(ours, reference).min() >= 0.9999
    np.testing.assert_allclose(bulk, ours[:10], atol=1e-6)  # both lanes, one graph
    np.testing.assert_allclose(ours, reference, atol=2e-4)


def test_second_start_reuses_the_cached_graph(embedder, caplog):
    entry = graph_entry(BUNDLED, "embedding")
    assert entry.parent.parent == cache_dir()  # the session's RAG_CACHE_DIR
    meta = (entry / META_FILE).read_text()
    inode = (entry / GRAPH_FILE).stat().st_ino
    with caplog.at_level(logging.INFO, logger="rag_service"):
        again = Embedder(str(BUNDLED), device="cpu", runtime="onnx")
    assert again.runtime == "onnx"
    assert not [r for r in caplog.records if "exporting" in r.getMessage()]
    assert (entry / META_FILE).read_text() == meta and (entry / GRAPH_FILE).stat().st_ino == inode
    assert json.loads(meta)["export_s"] > 0  # made once, by the first start of the session


def _rewrite_record(entry: Path) -> None:
    """Make ``meta.json`` match the graph file as it is now, so only ONNX Runtime or the
    probe can tell that the graph is wrong."""
    graph = entry / GRAPH_FILE
    meta = json.loads((entry / META_FILE).read_text())
    meta["size"] = graph.stat().st_size
    meta["sha256"] = hashlib.sha256(graph.read_bytes()).hexdigest()
    (entry / META_FILE).write_text(json.dumps(meta))


def _leftovers(entry: Path) -> list[str]:
    return sorted(p.name for p in entry.parent.iterdir() if p.name.startswith(".") and p.is_dir())


def test_a_truncated_cached_graph_is_discarded_and_exported_again(
    cache_copy, torch_embedder, caplog
):
    root, entry = cache_copy
    graph = entry / GRAPH_FILE
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    with caplog.at_level(logging.INFO, logger="rag_service"):
        fixed = Embedder(str(BUNDLED), device="cpu", cache_root=root, runtime="onnx")
    messages = [r.getMessage() for r in caplog.records]
    assert any("discarding the cached ONNX graph" in m and "bytes" in m for m in messages)
    assert any("exporting" in m for m in messages), messages
    assert fixed.runtime == "onnx", fixed.runtime_note
    texts = real_texts(20)
    assert cosines(fixed.encode(texts), torch_embedder.encode(texts)).min() >= 0.9999
    assert _leftovers(entry) == []  # no temporary or discarded directories left behind


@pytest.fixture
def int8_copy(cache_copy) -> tuple[Path, Path]:
    """(cache root, int8 entry): the int8 graph made from the copied full-precision one."""
    root, _ = cache_copy
    assert Embedder(str(BUNDLED), device="cpu", cache_root=root, quantize="int8").runtime == (
        "onnx-int8"
    )
    return root, graph_entry(BUNDLED, "embedding", cache_root=root, quantize="int8")


def _reopen_int8(root: Path, caplog: pytest.LogCaptureFixture) -> tuple[Embedder, list[str]]:
    with caplog.at_level(logging.INFO, logger="rag_service"):
        fixed = Embedder(str(BUNDLED), device="cpu", cache_root=root, quantize="int8")
    return fixed, [r.getMessage() for r in caplog.records]


def test_random_bytes_in_a_cached_graph_are_discarded_and_made_again(
    int8_copy, torch_embedder, caplog
):
    """Random bytes under a record rewritten to match: ONNX Runtime refuses the file."""
    root, entry = int8_copy
    graph = entry / GRAPH_FILE
    graph.write_bytes(np.random.default_rng(0).bytes(graph.stat().st_size))
    _rewrite_record(entry)
    fixed, messages = _reopen_int8(root, caplog)
    assert any("ONNX Runtime cannot open it" in m for m in messages), messages
    assert fixed.runtime == "onnx-int8", fixed.runtime_note
    texts = real_texts(20)
    assert cosines(fixed.encode(texts), torch_embedder.encode(texts)).min() >= 0.95
    assert _leftovers(entry) == []


def test_a_cached_graph_giving_wrong_vectors_fails_the_probe_and_is_replaced(
    int8_copy, torch_embedder, caplog
):
    """A valid graph, its record matching it, with tampered weights: only the probe can tell,
    and it does; the graph is made again and the vectors are right."""
    import onnx
    from onnx import numpy_helper

    root, entry = int8_copy
    model = onnx.load(str(entry / GRAPH_FILE))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(biggest).copy()
    weights[:, : weights.shape[1] // 2] *= -1.0
    biggest.CopyFrom(numpy_helper.from_array(weights, biggest.name))
    onnx.save(model, str(entry / GRAPH_FILE))
    _rewrite_record(entry)
    fixed, messages = _reopen_int8(root, caplog)
    assert any("does not reproduce PyTorch" in m for m in messages), messages
    assert fixed.runtime == "onnx-int8" and fixed.probe_cosine is not None
    texts = real_texts(20)
    assert cosines(fixed.encode(texts), torch_embedder.encode(texts)).min() >= 0.95


def _model_copy(tmp_path: Path, pooling: dict | None = None, modules: list | None = None) -> Path:
    copy = tmp_path / "model-copy"
    shutil.copytree(BUNDLED, copy)
    if pooling is not None:
        (copy / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if modules is not None:
        (copy / "modules.json").write_text(json.dumps(modules))
    return copy


def test_cls_pooling_is_read_from_the_model_directory(tmp_path, embedder, caplog):
    copy = _model_copy(tmp_path, {"word_embedding_dimension": 384, "pooling_mode_cls_token": True})
    with caplog.at_level(logging.INFO, logger="rag_service"):
        cls_onnx = Embedder(str(copy), device="cpu", runtime="onnx")
    assert cls_onnx.runtime == "onnx" and cls_onnx._pooling is not None
    assert cls_onnx._pooling.modes == ("cls",)
    assert not [r for r in caplog.records if "exporting" in r.getMessage()]  # same graph
    cls_torch = Embedder(str(copy), device="cpu", runtime="torch")
    texts = real_texts(20)
    tokens = cls_onnx.count_tokens(texts)
    assert cosines(cls_onnx.encode(texts, tokens), cls_torch.encode(texts, tokens)).min() >= 0.9999
    # ... and they are CLS vectors, not the mean the bundled model pools.
    assert cosines(cls_onnx.encode(texts, tokens), embedder.encode(texts, tokens)).max() < 0.99


ST = "sentence_transformers.models."
FALLBACKS = {
    "pooling-not-implemented": (
        {"pooling_mode": "lasttoken", "embedding_dimension": 384},
        None,
        "pooling mode lasttoken",
    ),
    "module-not-exported": (
        None,
        [
            {"idx": 0, "name": "0", "path": "", "type": ST + "Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST + "Pooling"},
            {"idx": 2, "name": "2", "path": "2_Dense", "type": ST + "Dense"},
        ],
        "Dense",
    ),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_a_model_onnx_cannot_represent_is_served_by_pytorch(case, tmp_path, fake_server, caplog):
    pooling, modules, why = FALLBACKS[case]
    copy = _model_copy(tmp_path, pooling, modules)
    if modules is not None:  # a real Dense layer, so PyTorch can load the model
        from sentence_transformers.models import Dense

        (copy / "2_Dense").mkdir()
        Dense(384, 384).save(str(copy / "2_Dense"))
    settings = Settings(
        data_dir=tmp_path / "data",
        embedding_model=str(copy),
        embedding_runtime="onnx",
        upstream_url=fake_server.url,
    )
    with (
        caplog.at_level(logging.INFO, logger="rag_service"),
        TestClient(create_app(settings), base_url=BASE_URL) as client,
    ):
        wait_ready(client)
        ready = client.get("/ready").json()
        got = client.post("/v1/embeddings", json={"input": "hello there"}).json()
    runtime = ready["runtimes"][ready["embedding_model"]]
    assert runtime["runtime"] == "torch" and why in runtime["note"], runtime
    assert any(
        "ONNX Runtime not used" in r.getMessage() and why in r.getMessage() for r in caplog.records
    )
    reference = Embedder(str(copy), device="cpu", runtime="torch").encode(["hello there"])[0]
    np.testing.assert_allclose(got["data"][0]["embedding"], reference, atol=1e-5)


def test_an_export_that_fails_leaves_the_service_on_pytorch(tmp_path, torch_embedder, caplog):
    not_a_dir = tmp_path / "cache-is-a-file"
    not_a_dir.write_text("")
    with caplog.at_level(logging.INFO, logger="rag_service"):
        fallback = Embedder(str(BUNDLED), device="cpu", cache_root=not_a_dir, runtime="onnx")
    assert fallback.runtime == "torch" and "ONNX cache could not be used" in fallback.runtime_note
    assert any("ONNX Runtime not used" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(
        fallback.encode(["a b c"]), torch_embedder.encode(["a b c"]), atol=1e-6
    )


def test_int8_is_opt_in_and_close_to_full_precision(onnx_embedder, torch_embedder):
    int8 = Embedder(str(BUNDLED), device="cpu", quantize="int8")
    assert onnx_embedder.runtime == "onnx" and int8.runtime == "onnx-int8"
    assert int8.runtimes == {"interactive": "onnx-int8", "bulk": "onnx-int8"}
    assert graph_entry(BUNDLED, "embedding", quantize="int8").is_dir()  # cached on its own
    texts = real_texts(30)
    agreement = cosines(int8.encode(texts), torch_embedder.encode(texts))
    assert agreement.min() >= 0.95 and agreement.mean() < 0.9999  # close, but not the same


def test_a_graph_opens_one_session_per_thread_count(onnx_embedder):
    graph = onnx_embedder._graph
    cores = onnx_embedder.cores
    assert graph is not None and graph.threads == sorted({cores, *lane_shares(cores).values()})
    features = onnx_embedder.tokenize_arrays(["one query"])
    alone = graph.run(features, onnx_embedder.cores)
    shared = graph.run(features, 1)
    np.testing.assert_allclose(alone, shared, atol=1e-5)  # the pool's size changes no result
    assert graph.session(64) is graph.session(onnx_embedder.cores)  # capped at the largest


def test_a_lone_query_does_not_wait_for_company(tmp_path, embedder, fake_server):
    settings = Settings(
        data_dir=tmp_path / "data",
        batch_wait_ms=500,
        batch_max_wait_ms=500,
        upstream_url=fake_server.url,
    )
    with TestClient(create_app(settings, embedder=embedder), base_url=BASE_URL) as client:
        wait_ready(client)
        took = []
        for i in range(7):
            started = time.perf_counter()
            resp = client.post("/v1/embeddings", json={"input": f"a lone query {i}"})
            took.append(time.perf_counter() - started)
            assert resp.status_code == 200
    assert sorted(took)[3] < 0.25, took  # a 500 ms batching wait would show in every one


# ---- the reranker ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cross-encoder: MiniLM with a fresh, seeded one-output head (as in test_reranking)."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    model = CrossEncoder(str(BUNDLED), num_labels=1, device="cpu")
    with torch.no_grad():
        model[0].model.classifier.weight.mul_(50)
    path = tmp_path_factory.mktemp("reranker") / "minilm-ce"
    model.save(str(path))
    return path


def test_reranker_on_onnx_gives_the_pytorch_scores(cross_encoder_dir):
    on_onnx = Reranker(str(cross_encoder_dir), device="cpu")
    on_torch = Reranker(str(cross_encoder_dir), device="cpu", runtime="torch")
    assert on_onnx.runtime == "onnx", on_onnx.runtime_note
    assert on_torch.runtime == "torch"
    texts = real_texts(40)
    pairs = [(q, t) for q in texts[30:32] for t in texts[:16]]
    got, want = on_onnx.predict(pairs), on_torch.predict(pairs)
    assert np.ptp(want) > 0.1  # the scores spread, so agreement means something
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert list(np.argsort(-got)) == list(np.argsort(-want))
