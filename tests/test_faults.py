"""Faults: damaged index snapshots, a store locked by another process, repeated kill -9.

Every damaged snapshot is discarded and its index rebuilt from the store (nothing re-embedded),
without touching the other collections; a lock held past the busy timeout is a 503 with
Retry-After that leaves nothing half-written; crashes in a row lose no acknowledged write.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import struct
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest

from indexes.faiss_index import FaissIndex, SnapshotCorrupt, max_snapshot_bytes, write_snapshot
from indexes.protocol import IndexMeta, IndexMismatchError
from tests.support import (
    code_word,
    error_of,
    free_port,
    ingest_until_killed,
    start_subprocess_server,
    wait_http_ready,
)
from tests.test_documents import search, upsert

KB_DOCS = [
    {"id": "volcano", "text": "Magma rises through the crust and erupts from the volcano."},
    {"id": "violin", "text": "The violin is a bowed string instrument with four strings."},
    {"id": "bread", "text": "Sourdough bread rises slowly thanks to wild yeast."},
    {"id": "comet", "text": "A comet grows a glowing tail as it nears the sun."},
]
KB_QUERIES = {
    "eruption of molten rock": "volcano",
    "string instrument played with a bow": "violin",
    "baking with yeast": "bread",
}
OTHER_DOCS = [
    {"id": "tides", "text": "Tides follow the pull of the moon on the oceans."},
    {"id": "chess", "text": "In chess the knight moves in an L shape."},
    {"id": "glacier", "text": "Glaciers carve valleys as the ice slowly flows downhill."},
]
OTHER_QUERIES = {"board game pieces": "chess", "moving ice carving valleys": "glacier"}


# ---- damaged snapshots ---------------------------------------------------------------------
def _flat_codes_size_offset(data: bytes) -> int:
    """Offset of the size field of the float vectors of a serialized IDMap2(IndexFlatIP)."""
    assert data[:4] == b"IxM2" and data[37:41] == b"IxFI", data[:48]
    return 41 + 33  # inner fourcc, then d, ntotal, two dummies, is_trained, metric


def _reseal(faiss_path: Path, data: bytes, *, staged: bool = False) -> None:
    """Write ``data`` with metadata that matches it (right checksum, the collection's meta),
    so the checks past the checksum are the ones that must refuse it."""
    meta = IndexMeta(**json.loads(faiss_path.with_suffix(".json").read_text())["meta"])
    write_snapshot(faiss_path, data, meta, staged=staged)


def _edit_json(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def corrupt(faiss_path: Path) -> None:
        path = faiss_path.with_suffix(".json")
        stored = json.loads(path.read_text())
        edit(stored)
        path.write_text(json.dumps(stored))

    return corrupt


def _write_json(text: str | bytes) -> Callable[[Path], None]:
    def corrupt(faiss_path: Path) -> None:
        path = faiss_path.with_suffix(".json")
        path.write_bytes(text.encode() if isinstance(text, str) else text)

    return corrupt


def _truncate(faiss_path: Path) -> None:
    data = faiss_path.read_bytes()
    faiss_path.write_bytes(data[: len(data) // 2])


def _truncate_resealed(faiss_path: Path) -> None:
    _reseal(faiss_path, faiss_path.read_bytes()[:-100])


def _empty(faiss_path: Path) -> None:
    faiss_path.write_bytes(b"")


def _garbage(faiss_path: Path) -> None:
    faiss_path.write_bytes(os.urandom(faiss_path.stat().st_size))


def _garbage_resealed(faiss_path: Path) -> None:
    _reseal(faiss_path, b"IxM2" + os.urandom(faiss_path.stat().st_size))


def _size_field_2_36(faiss_path: Path) -> None:
    """The vectors' size field says 2^36 (FAISS would allocate 256 GiB, then fail)."""
    data = bytearray(faiss_path.read_bytes())
    struct.pack_into("<Q", data, _flat_codes_size_offset(bytes(data)), 2**36)
    faiss_path.write_bytes(bytes(data))


def _ntotal_2_36_resealed(faiss_path: Path) -> None:
    data = bytearray(faiss_path.read_bytes())
    struct.pack_into("<q", data, 8, 2**36)  # IDMap2 header: fourcc, d, then ntotal
    _reseal(faiss_path, bytes(data))


def _other_dimension(faiss_path: Path) -> None:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(64))
    index.add_with_ids(np.eye(64, dtype=np.float32)[:4], np.arange(1, 5, dtype=np.int64))
    _reseal(faiss_path, bytes(faiss.serialize_index(index)))


def _other_family(faiss_path: Path) -> None:
    index = faiss.IndexIDMap2(faiss.IndexHNSWFlat(384, 16, faiss.METRIC_INNER_PRODUCT))
    index.add_with_ids(np.eye(384, dtype=np.float32)[:4], np.arange(1, 5, dtype=np.int64))
    _reseal(faiss_path, bytes(faiss.serialize_index(index)))


def _other_metric(faiss_path: Path) -> None:
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(384))
    index.add_with_ids(np.eye(384, dtype=np.float32)[:4], np.arange(1, 5, dtype=np.int64))
    _reseal(faiss_path, bytes(faiss.serialize_index(index)))


def _staged_flag_wrong(faiss_path: Path) -> None:
    _reseal(faiss_path, faiss_path.read_bytes(), staged=True)


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "json-list": _write_json("[1, 2]"),
    "json-meta-list": _write_json('{"meta": [1]}'),
    "json-not-utf8": _write_json(b"\xff\xfe{"),
    "json-deeply-nested": _write_json("[" * 60_000),
    "json-staged-string": _edit_json(lambda s: s.update(staged="yes")),
    "json-bytes-string": _edit_json(lambda s: s.update(bytes=str(s.get("bytes")))),
    "json-checksum-missing": _edit_json(lambda s: s.pop("sha256", None)),
    "json-dimension-string": _edit_json(lambda s: s["meta"].update(dimension="384")),
    "faiss-truncated": _truncate,
    "faiss-truncated-resealed": _truncate_resealed,
    "faiss-empty": _empty,
    "faiss-garbage": _garbage,
    "faiss-garbage-resealed": _garbage_resealed,
    "faiss-size-field-2^36": _size_field_2_36,
    "faiss-ntotal-2^36-resealed": _ntotal_2_36_resealed,
    "faiss-other-dimension": _other_dimension,
    "faiss-other-family": _other_family,
    "faiss-other-metric": _other_metric,
    "faiss-staged-flag-wrong": _staged_flag_wrong,
}


def _check_searches(client) -> None:
    for query, doc_id in KB_QUERIES.items():
        assert search(client, query)[0]["document_id"] == doc_id, query
    for query, doc_id in OTHER_QUERIES.items():
        assert search(client, query, collection="other")[0]["document_id"] == doc_id, query


def _restore_reports(client) -> dict[str, dict]:
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    return {r["collection"]: r for r in ready.json()["restore"]}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_damaged_snapshot_is_rebuilt_and_spares_the_others(make_client, tmp_path, kind):
    data = tmp_path / "store"
    first = make_client(data_dir=data)
    upsert(first, KB_DOCS)  # collection 1
    upsert(first, OTHER_DOCS, collection="other")  # collection 2
    first.__exit__(None, None, None)  # clean shutdown writes both snapshots
    kb_path = data / "indexes" / "1.faiss"
    assert kb_path.exists() and (data / "indexes" / "2.faiss").exists()
    CORRUPTIONS[kind](kb_path)

    second = make_client(data_dir=data)
    reports = _restore_reports(second)
    assert (reports["kb"]["from_snapshot"], reports["kb"]["added_from_store"]) == (0, 4)
    assert (reports["other"]["from_snapshot"], reports["other"]["added_from_store"]) == (3, 0)
    assert reports["kb"]["reembedded"] == 0
    errors = {r.collection: r.snapshot_error for r in second.app.state["kb"].engine.reports}
    assert errors["kb"] and errors["other"] is None
    _check_searches(second)
    coll = {c["name"]: c for c in second.get("/v1/collections").json()["data"]}
    assert (coll["kb"]["documents"], coll["other"]["documents"]) == (4, 3)
    second.__exit__(None, None, None)  # the rebuilt index replaces the damaged snapshot

    third = make_client(data_dir=data)
    reports = _restore_reports(third)
    assert (reports["kb"]["from_snapshot"], reports["kb"]["added_from_store"]) == (4, 0)
    _check_searches(third)


DIM = 32
rng = np.random.default_rng(11)


def _unit(n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _saved_flat(tmp_path: Path, n: int = 50, dim: int = DIM) -> tuple[Path, IndexMeta]:
    meta = IndexMeta(embedding_model="m", dimension=dim)
    index = FaissIndex(meta, use_gpu=False)
    index.add(np.arange(n, dtype=np.int64), _unit(n, dim))
    path = tmp_path / "i.faiss"
    index.save(path)
    return path, meta


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_load_refuses_damaged_snapshot(tmp_path, kind):
    path, meta = _saved_flat(tmp_path)
    CORRUPTIONS[kind](path)
    with pytest.raises(IndexMismatchError):
        FaissIndex.load(path, meta, expected_vectors=50, use_gpu=False)


def test_load_refuses_file_too_large_for_the_store(tmp_path):
    path, meta = _saved_flat(tmp_path, n=2000, dim=384)
    assert FaissIndex.load(path, meta, expected_vectors=2000, use_gpu=False).ids().size == 2000
    # The store holds 10 chunks: a snapshot of 2000 vectors is not this collection's.
    with pytest.raises(SnapshotCorrupt, match="more than the"):
        FaissIndex.load(path, meta, expected_vectors=10, use_gpu=False)


def _alloc_fails(nbytes: int) -> bool:
    """True when the kernel refuses an allocation of ``nbytes`` outright (no overcommit)."""
    try:
        mode = int(Path("/proc/sys/vm/overcommit_memory").read_text())
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return False
    return mode in (0, 2) and nbytes > 4 * total


def test_load_turns_faiss_allocation_failure_into_snapshot_corrupt(tmp_path):
    """Past the checksum (resealed), FAISS itself meets the 2^36 size field: its bad_alloc
    (MemoryError) is refused like any other unreadable snapshot."""
    if not _alloc_fails(4 * 2**36):
        pytest.skip("this machine would try to satisfy a 256 GiB allocation")
    path, meta = _saved_flat(tmp_path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, _flat_codes_size_offset(bytes(data)), 2**36)
    write_snapshot(path, bytes(data), meta, staged=False)
    with pytest.raises(SnapshotCorrupt, match="FAISS cannot read") as info:
        FaissIndex.load(path, meta, expected_vectors=50, use_gpu=False)
    assert isinstance(info.value.__cause__, MemoryError)


@pytest.mark.parametrize(
    ("factory", "dim", "n", "tombstoned"),
    [
        ("Flat", DIM, 1, 0),
        ("Flat", 384, 500, 0),
        ("HNSW32", DIM, 1200, 240),
        ("HNSW128", DIM, 1200, 0),
        ("HNSW16,SQ8", 384, 300, 0),
        ("HNSW16,PQ8", DIM, 1100, 0),
        ("IVF4,Flat", DIM, 900, 0),  # still staged: exact, untrained
        ("IVF4,Flat", DIM, 1200, 0),
        ("IVF8_HNSW32,SQ8", DIM, 1200, 0),
        ("IVF4,PQ8x4", DIM, 1200, 0),
        ("SQ8", DIM, 1200, 0),
        ("PQ4", DIM, 1200, 0),
    ],
)
def test_healthy_snapshots_of_every_family_fit_the_bound(tmp_path, factory, dim, n, tombstoned):
    meta = IndexMeta(embedding_model="m", dimension=dim, factory=factory)
    index = FaissIndex(meta, use_gpu=False)
    vecs = _unit(n, dim)
    index.add(np.arange(n, dtype=np.int64), vecs)
    index.remove(np.arange(tombstoned, dtype=np.int64))  # HNSW keeps them as tombstones
    path = tmp_path / "i.faiss"
    index.save(path)
    live = n - tombstoned
    assert path.stat().st_size <= max_snapshot_bytes(meta, live)
    loaded = FaissIndex.load(path, meta, expected_vectors=live, use_gpu=False)
    assert loaded.staged == index.staged
    loaded.remove(np.arange(tombstoned, dtype=np.int64))  # as the restore's reconcile does
    queries = vecs[-3:]
    assert loaded.search(queries, 5)[1].tolist() == index.search(queries, 5)[1].tolist()


# ---- a store locked by another process --------------------------------------------------------
def _busy(resp: httpx.Response, what: str) -> None:
    assert resp.status_code == 503, (what, resp.status_code, resp.text)
    assert int(resp.headers["retry-after"]) >= 1, what
    err = error_of(resp)
    assert err["type"] == "overloaded_error", (what, err)
    assert "cannot rollback" not in err["message"], err


def _state(client) -> dict[str, tuple[int, int]]:
    return {
        c["name"]: (c["documents"], c["chunks"])
        for c in client.get("/v1/collections").json()["data"]
    }


def test_store_locked_past_the_busy_timeout_is_503_and_leaves_nothing_behind(make_client, tmp_path):
    data = tmp_path / "store"
    client = make_client(data_dir=data, sqlite_busy_timeout_ms=200)
    upsert(client, KB_DOCS)
    new_doc = {"id": "beaver", "text": "Beavers build dams of branches across streams."}
    writes: dict[str, Callable[[], httpx.Response]] = {
        "upsert": lambda: client.post(
            "/v1/collections/kb/documents", json={"documents": [new_doc]}
        ),
        "replace": lambda: client.post(
            "/v1/collections/kb/documents",
            json={"documents": [{"id": "comet", "text": "Comets are icy bodies."}]},
        ),
        "delete": lambda: client.delete("/v1/collections/kb/documents/volcano"),
        "create": lambda: client.post("/v1/collections", json={"name": "fresh"}),
        "upsert-new-collection": lambda: client.post(
            "/v1/collections/newbie/documents", json={"documents": [new_doc]}
        ),
    }
    blocker = sqlite3.connect(data / "rag.sqlite3", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for what, call in writes.items():
            _busy(call(), what)
        _busy(client.delete("/v1/collections/kb"), "drop")
        # Readers do not wait for a writer (WAL): reads keep working meanwhile.
        assert client.get("/v1/collections/kb/documents/volcano").status_code == 200
        listed = client.get("/v1/collections/kb/documents").json()["data"]
        assert [d["id"] for d in listed] == sorted(d["id"] for d in KB_DOCS)
        assert search(client, "eruption of molten rock")[0]["document_id"] == "volcano"
        assert search(client, "dams", mode="hybrid")[0]["document_id"] != "beaver"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    # Nothing of the refused writes is in the store or the index.
    assert _state(client) == {"kb": (4, 4)}
    assert client.get("/v1/collections/kb/documents/beaver").status_code == 404
    hits = search(client, "icy bodies", top_k=10)
    assert {h["document_id"] for h in hits} == {d["id"] for d in KB_DOCS}
    assert all(h["text"] != "Comets are icy bodies." for h in hits)

    # The same requests succeed once the lock is gone.
    results = {what: call() for what, call in writes.items()}
    assert results["upsert"].json()["documents"][0]["status"] == "created"
    assert results["replace"].json()["documents"][0]["status"] == "updated"
    assert results["delete"].status_code == 204
    assert results["create"].status_code == 201
    assert results["upsert-new-collection"].status_code == 200
    assert _state(client) == {"fresh": (0, 0), "kb": (4, 4), "newbie": (1, 1)}
    assert search(client, "dams across streams")[0]["document_id"] == "beaver"
    assert search(client, "icy bodies")[0]["text"] == "Comets are icy bodies."
    hits = search(client, "eruption of molten rock", top_k=10)
    assert "volcano" not in {h["document_id"] for h in hits} and len(hits) == 4
    assert client.delete("/v1/collections/kb").status_code == 204


# ---- kill -9 in a row -------------------------------------------------------------------------
def _list_ids(client: httpx.Client, collection: str) -> set[str]:
    ids: set[str] = set()
    after = None
    while True:
        params: dict[str, str | int] = {"limit": 1000, **({"after": after} if after else {})}
        body = client.get(f"/v1/collections/{collection}/documents", params=params).json()
        ids |= {d["id"] for d in body["data"]}
        if not body["has_more"]:
            return ids
        after = body["last_id"]


def _check_restored(url: str, acknowledged: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        report = client.get("/ready").json()["restore"][0]
        assert report["reembedded"] == 0
        listed = _list_ids(client, "crash")
        assert set(acknowledged) <= listed
        coll = client.get("/v1/collections").json()["data"][0]
        assert coll["documents"] == len(listed) == coll["chunks"]
        assert (
            report["from_snapshot"] + report["added_from_store"] - report["removed_stale"]
            == coll["chunks"]
        )
        for doc_id in acknowledged[-4:] + acknowledged[:2]:
            hits = client.post(
                "/v1/collections/crash/search",
                json={"query": f"the code word is {code_word(doc_id)}", "top_k": 50, "filter": {}},
            ).json()["results"]
            assert doc_id in {h["document_id"] for h in hits}, doc_id


def test_kill_9_mid_ingest_three_times_in_a_row(tmp_path):
    """Three crashes in a row, snapshots written every 0.2 s so kills also land during one:
    each restart restores every acknowledged write, and none is re-embedded."""
    data = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    acknowledged: list[str] = []
    for round_ in range(3):
        proc = start_subprocess_server(data, port, RAG_SNAPSHOT_INTERVAL_S="0.2")
        try:
            wait_http_ready(url, proc)
            if acknowledged:
                _check_restored(url, acknowledged)
            target = len(acknowledged) + 24
            ingest_until_killed(
                url,
                lambda proc=proc: (proc.send_signal(signal.SIGKILL), proc.wait(timeout=30)),
                acknowledged,
                at_least=target,
                settle_s=0.1 * (round_ + 1),  # vary where in the snapshot cycle it dies
                tag=f"{round_}x",
            )
        finally:
            if proc.poll() is None:
                proc.kill()
        assert len(acknowledged) >= target

    proc = start_subprocess_server(data, port)
    try:
        wait_http_ready(url, proc)
        _check_restored(url, acknowledged)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_sigterm_stops_the_server_while_a_loader_runs(tmp_path):
    """SIGTERM while an upload's file is being parsed (a file that would take a loader about
    40 s): the server stops within its 10 s grace period, the loader process with it (a
    loader thread used to hold the interpreter past the grace period)."""
    import threading

    import psutil

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_subprocess_server(
        tmp_path / "data", port, RAG_MAX_DOCUMENT_ELEMENTS="10000000", RAG_LOADER_TIMEOUT_S="600"
    )
    try:
        wait_http_ready(url, proc)
        slow = b"<html><body>" + b"<b>x</b> " * 1_000_000 + b"</body></html>"
        files = [("files", ("slow.html", slow, "text/html"))]

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server goes away: expected
                httpx.post(f"{url}/v1/collections/kb/files", files=files, timeout=60)

        sender = threading.Thread(target=send)
        sender.start()
        server = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while not any(c.cpu_percent(0.2) > 50 for c in server.children(recursive=True)):
            assert time.monotonic() < deadline, "no loader process started parsing"
        descendants = server.children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=25)  # the grace period is 10 s
        sender.join(timeout=30)
        _, alive = psutil.wait_procs(descendants, timeout=5)
        assert not alive, f"left running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
