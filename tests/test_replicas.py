"""Several ``rag-service serve`` processes on one PostgreSQL database, as real subprocesses.

Two replicas (different ports and data directories, one ``RAG_DATABASE_URL``) serve the same
collections at once; ``serve --workers N`` runs N processes on one port; a replica killed with
SIGKILL mid-ingest loses no acknowledged write; a replica whose database stops answers 503 and
recovers by itself when it returns. The embedded engine refuses ``--workers``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rag_service.cli import main
from tests.pg import PgCluster
from tests.support import (
    CRASH_BATCH,
    ROOT,
    code_word,
    error_of,
    free_port,
    ingest_until_killed,
    start_subprocess_server,
    wait_http_ready,
)
from tests.test_documents import search, upsert


class Replica:
    """One ``rag-service serve`` child process on its own port and data directory; the
    database URL comes from the environment, or from ``args`` (``serve``'s flags)."""

    def __init__(self, data_dir: Path, database_url: str | None, *args: str, **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.env = {"RAG_DATABASE_URL": database_url, **env} if database_url else env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        if not self.args:
            self.proc = start_subprocess_server(self.data_dir, self.port, **self.env)
            return self
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
        log = open(f"{self.data_dir}.log", "ab")  # noqa: SIM115 - the child process owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rag_service", "serve", *self.args],
            env={
                **env,
                "RAG_DATA_DIR": str(self.data_dir),
                "RAG_PORT": str(self.port),
                "RAG_LOG_LEVEL": "WARNING",
                "RAG_UPSTREAM_URL": f"{self.url}/none",
                "RAG_UPSTREAM_MODEL": "none",
                **self.env,
            },
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self) -> Replica:
        assert self.proc is not None
        try:
            wait_http_ready(self.url, self.proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log ends with:\n{self.log_tail()}") from None
        return self

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_tail(self, chars: int = 4000) -> str:
        log = Path(f"{self.data_dir}.log")
        return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def start_all(*replicas: Replica) -> None:
    """Start every replica, then wait for each (their models load side by side)."""
    for r in replicas:
        r.start()
    for r in replicas:
        r.wait_ready()


def list_all(client: httpx.Client, collection: str) -> list[dict[str, Any]]:
    """Every document of a collection, following the pages."""
    docs: list[dict[str, Any]] = []
    after = None
    while True:
        resp = client.get(
            f"/v1/collections/{collection}/documents",
            params={"limit": 1000, **({"after": after} if after else {})},
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        docs += body["data"]
        if not body["has_more"]:
            return docs
        after = body["last_id"]


def collection_info(client: httpx.Client, name: str) -> dict[str, Any]:
    resp = client.get("/v1/collections")
    assert resp.status_code == 200, resp.text
    found = [c for c in resp.json()["data"] if c["name"] == name]
    assert len(found) == 1, resp.json()
    return dict(found[0])


@pytest.fixture(scope="module")
def replicas(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Replica, Replica]]:
    """Replicas A and B: own ports and data directories, one fresh database."""
    database_url = pg_cluster.create_database()
    root = tmp_path_factory.mktemp("replicas")
    a = Replica(root / "a", database_url)
    b = Replica(root / "b", database_url)
    try:
        start_all(a, b)
        yield a, b
    finally:
        a.stop()
        b.stop()


# ---- serve --workers -----------------------------------------------------------------------
def test_workers_refused_for_the_embedded_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--workers", "2", "--data-dir", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "RAG_WORKERS" in message and "RAG_DATABASE_URL" in message
    assert "single-process" in message
    # The same from the environment, as a real process: it exits at once, serving nothing.
    env = {k: v for k, v in os.environ.items() if k != "RAG_DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "rag_service", "serve", "--data-dir", str(tmp_path)],
        env={**env, "RAG_WORKERS": "2", "RAG_PORT": str(free_port())},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "RAG_WORKERS" in done.stderr and "single-process" in done.stderr
    # One worker is the default and always allowed; fewer than one is not.
    assert main(["serve", "--workers", "0", "--data-dir", str(tmp_path)]) == 2
    assert "RAG_WORKERS: must be at least 1" in capsys.readouterr().err


def _parent_of(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")".
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_serve_workers_runs_n_processes_on_one_port(pg_cluster: PgCluster, tmp_path: Path) -> None:
    # As flags, which the workers (fresh processes that read the environment) must receive.
    flags = ("--workers", "2", "--database-url", pg_cluster.create_database())
    server = Replica(tmp_path / "data", None, *flags)
    server.start()
    assert server.proc is not None
    pids: set[int] = set()
    try:
        # Each new connection is accepted by whichever worker gets there first: keep asking
        # until both have answered /ready (each worker loads its own model).
        deadline = time.monotonic() + 180
        while len(pids) < 2:
            assert server.proc.poll() is None, server.log_tail()
            assert time.monotonic() < deadline, f"ready workers: {pids}\n{server.log_tail()}"
            try:
                resp = httpx.get(server.url + "/ready", timeout=5)
                if resp.status_code == 200:
                    assert resp.json()["engine"] == "postgres", resp.json()
                    pids.add(resp.json()["pid"])
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert server.proc.pid not in pids
        assert {_parent_of(pid) for pid in pids} == {server.proc.pid}
        # Whichever worker answers, it serves the one database: a write through one
        # connection is found through every later one.
        with server.client() as client:
            upsert(client, [{"id": "w", "text": "Workers share one PostgreSQL database."}])
        seen: set[int] = set()
        for _ in range(40):
            with server.client() as client:  # a new connection each time
                hits = search(client, "which database do workers share?", top_k=1)
                assert [h["document_id"] for h in hits] == ["w"]
                seen.add(client.get("/ready").json()["pid"])
        assert seen <= pids
    finally:
        server.stop()
        for pid in pids:  # the parent ends its workers; any left over are ended here
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"worker {pid} outlived its parent")
    assert server.proc.returncode == 0, server.log_tail()


# ---- two replicas, one database -------------------------------------------------------------
def test_write_through_a_is_read_through_b_at_once(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    with a.client() as ca, b.client() as cb:
        for i in range(3):
            doc_id = f"note-{i}"
            text = f"Note {i}: the harbour lighthouse code is lamp-{i}."
            upsert(ca, [{"id": doc_id, "text": text, "metadata": {"n": i}}], "shared")
            got = cb.get(f"/v1/collections/shared/documents/{doc_id}")  # no wait in between
            assert got.status_code == 200, got.text
            assert (got.json()["text"], got.json()["metadata"]) == (text, {"n": i})
            hits = search(cb, f"lighthouse code lamp-{i}", "shared", top_k=1, filter={"n": i})
            assert [h["document_id"] for h in hits] == [doc_id]
            hybrid = search(cb, f"lamp-{i}", "shared", top_k=3, mode="hybrid")
            assert hybrid[0]["document_id"] == doc_id
        assert [d["id"] for d in list_all(cb, "shared")] == ["note-0", "note-1", "note-2"]
        assert collection_info(cb, "shared")["documents"] == 3


def test_collection_created_through_a_is_usable_through_b(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    with a.client() as ca, b.client() as cb:
        made = ca.post(
            "/v1/collections",
            json={"name": "made-on-a", "index": "HNSW16", "chunk_tokens": 16, "chunk_overlap": 0},
        )
        assert made.status_code == 201, made.text
        info = collection_info(cb, "made-on-a")
        assert (info["index"], info["chunk_tokens"], info["chunk_overlap"]) == ("HNSW16", 16, 0)
        # B chunks with A's options: 16 tokens a chunk.
        text = " ".join(f"Sentence {i} of the shared manual about ferries." for i in range(8))
        out = upsert(cb, [{"id": "manual", "text": text}], "made-on-a")
        assert out["manual"]["chunks"] > 2
        hits = search(ca, "ferries manual", "made-on-a", top_k=50)
        assert len(hits) == out["manual"]["chunks"]
        # Created twice: the second replica is told it exists.
        again = cb.post("/v1/collections", json={"name": "made-on-a"})
        assert again.status_code == 409 and error_of(again)["code"] == "collection_exists"
        # Dropped through B: gone for A at once.
        assert cb.delete("/v1/collections/made-on-a").status_code == 204
        gone = ca.post("/v1/collections/made-on-a/search", json={"query": "ferries"})
        assert gone.status_code == 404, gone.text
        assert "made-on-a" not in {c["name"] for c in ca.get("/v1/collections").json()["data"]}


def test_delete_through_b_is_seen_by_a(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    with a.client() as ca, b.client() as cb:
        upsert(
            ca,
            [
                {"id": "keep", "text": "Glaciers carve valleys over centuries."},
                {"id": "drop", "text": "Violins are tuned in fifths."},
            ],
            "deletes",
        )
        assert cb.delete("/v1/collections/deletes/documents/drop").status_code == 204
        assert ca.get("/v1/collections/deletes/documents/drop").status_code == 404
        hits = search(ca, "how are violins tuned?", "deletes", top_k=5)
        assert [h["document_id"] for h in hits] == ["keep"]
        assert [d["id"] for d in list_all(ca, "deletes")] == ["keep"]
        info = collection_info(ca, "deletes")
        assert (info["documents"], info["chunks"]) == (1, 1)
        again = ca.delete("/v1/collections/deletes/documents/drop")
        assert again.status_code == 404 and error_of(again)["code"]


def test_concurrent_upserts_of_one_id_through_both_replicas(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    collection = "race"

    def sentences(writer: str, rnd: int, about: str, n: int) -> str:
        return " ".join(
            f"Writer {writer} round {rnd} sentence {j} about {about}." for j in range(n)
        )

    def version(writer: str, rnd: int) -> dict[str, Any]:
        # A's versions are short (few chunks), B's long: a mix of two would show.
        text = sentences(writer, rnd, "the contested record", 2 if writer == "a" else 7)
        meta = {"doc": "contested", "writer": writer, "round": rnd}
        return {"id": "contested", "text": text, "metadata": meta}

    def request(writer: str, rnd: int) -> dict[str, Any]:
        # A document of its own evens out the two requests' work (as many chunks to embed and
        # to write), so that both reach the database together and their writes overlap.
        pad = sentences(writer, rnd, "padding", 7 if writer == "a" else 2)
        return {"documents": [version(writer, rnd), {"id": f"pad-{writer}", "text": pad}]}

    async def race() -> None:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=60) as ca,
            httpx.AsyncClient(base_url=b.url, timeout=60) as cb,
        ):
            for rnd in range(20):
                answers = await asyncio.gather(
                    ca.post(f"/v1/collections/{collection}/documents", json=request("a", rnd)),
                    cb.post(f"/v1/collections/{collection}/documents", json=request("b", rnd)),
                )
                for resp in answers:
                    assert resp.status_code == 200, resp.text
                # A later round would replace whatever this one left: look after each.
                reader = (ca, cb)[rnd % 2]
                doc = (await reader.get(f"/v1/collections/{collection}/documents/contested")).json()
                found = await reader.post(
                    f"/v1/collections/{collection}/search",
                    json={"query": "contested", "top_k": 100, "filter": {"doc": "contested"}},
                )
                hits = found.json()["results"]
                assert len(hits) == doc["chunks"], (rnd, doc, hits)
                assert all(h["metadata"] == doc["metadata"] for h in hits), (rnd, doc, hits)

    with a.client() as ca, b.client() as cb:
        for name in (collection, "probe"):
            made = ca.post(
                "/v1/collections", json={"name": name, "chunk_tokens": 16, "chunk_overlap": 0}
            )
            assert made.status_code == 201, made.text
        upsert(
            cb,
            [
                {"id": "bystander-1", "text": "Tides follow the moon.", "metadata": {"doc": "x"}},
                {"id": "bystander-2", "text": "Bees dance to tell direction."},
            ],
            collection,
        )
        asyncio.run(race())

        final = ca.get(f"/v1/collections/{collection}/documents/contested").json()
        assert cb.get(f"/v1/collections/{collection}/documents/contested").json() == final
        # One of the last round's two versions, whole: its text with its own metadata.
        winner = version(final["metadata"]["writer"], 19)
        assert final["metadata"]["round"] == 19
        assert (final["text"], final["metadata"]) == (winner["text"], winner["metadata"])
        short, long_ = (
            upsert(ca, [{**version(w, 99), "id": f"probe-{w}"}], "probe")[f"probe-{w}"]["chunks"]
            for w in ("a", "b")
        )
        assert final["chunks"] == (short if final["metadata"]["writer"] == "a" else long_)
        assert short < long_

        # Exactly its chunks in the index, no duplicates and none of the losing versions.
        for client in (ca, cb):
            for mode in ("dense", "hybrid"):
                hits = search(
                    client,
                    "the contested record",
                    collection,
                    top_k=100,
                    filter={"doc": "contested"},
                    mode=mode,
                )
                assert len(hits) == final["chunks"], (mode, hits)
                assert len({h["chunk_id"] for h in hits}) == len(hits)
                assert sorted(h["position"] for h in hits) == list(range(final["chunks"]))
                assert all(h["metadata"] == final["metadata"] for h in hits)
                assert all(h["text"] in final["text"] for h in hits)

        docs = list_all(ca, collection)
        ids = ["bystander-1", "bystander-2", "contested", "pad-a", "pad-b"]
        assert [d["id"] for d in docs] == ids
        for client in (ca, cb):
            info = collection_info(client, collection)
            assert info["documents"] == len(ids)
            assert info["chunks"] == sum(d["chunks"] for d in docs)


# ---- kill -9 mid-ingest ---------------------------------------------------------------------
def test_kill_9_of_a_replica_mid_ingest_loses_no_acknowledged_write(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    database_url = pg_cluster.create_database()
    a = Replica(tmp_path / "a", database_url)
    b = Replica(tmp_path / "b", database_url)
    acknowledged: list[str] = []
    try:
        start_all(a, b)
        ingest_until_killed(a.url, a.kill, acknowledged, at_least=40)
        assert len(acknowledged) >= 40, a.log_tail()

        def check(client: httpx.Client) -> None:
            listed = list_all(client, "crash")
            ids = {d["id"] for d in listed}
            assert set(acknowledged) <= ids
            # What the kill cut short is all there or not there: whole batches only.
            per_batch = Counter(i.split("-")[1] for i in ids)
            assert set(per_batch.values()) == {CRASH_BATCH}
            info = collection_info(client, "crash")
            assert info["documents"] == len(listed)
            assert info["chunks"] == sum(d["chunks"] for d in listed) == len(listed)
            for doc_id in acknowledged[-3:] + acknowledged[:2]:
                batch = doc_id.split("-")[1]
                got = client.get(f"/v1/collections/crash/documents/{doc_id}")
                assert got.status_code == 200, got.text
                hits = search(
                    client,
                    f"the code word is {code_word(doc_id)}",
                    "crash",
                    top_k=8,
                    filter={"batch": int(batch)},
                )
                assert doc_id in {h["document_id"] for h in hits}

        with b.client() as client:  # the other replica, at once
            check(client)
        a.start().wait_ready()  # the killed one, restarted
        with a.client() as client:
            check(client)
    finally:
        a.stop()
        b.stop()


# ---- the database stopped and started while serving ------------------------------------------
def _unavailable(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["Retry-After"]) > 0
    assert error_of(resp)["type"] == "service_unavailable"


def test_database_stopped_and_started_while_serving(tmp_path: Path) -> None:
    cluster = PgCluster()  # a server of its own: the shared one is not disturbed
    replica = Replica(tmp_path / "data", cluster.create_database())
    try:
        start_all(replica)
        written = [
            {"id": f"before-{i}", "text": f"Entry {i}: the vault number is v{i}00."}
            for i in range(6)
        ]
        with replica.client() as client:
            upsert(client, written, "vault")
        cluster.stop()

        with replica.client() as client:
            deadline = time.monotonic() + 30
            while (ready := client.get("/ready")).status_code == 200:
                assert time.monotonic() < deadline, "/ready never noticed the database stop"
                time.sleep(0.1)
            _unavailable(ready)
            assert error_of(ready)["code"] == "store_unavailable"

        async def data_routes() -> tuple[httpx.Response, ...]:
            async with httpx.AsyncClient(base_url=replica.url, timeout=60) as client:
                return await asyncio.gather(
                    client.post("/v1/collections/vault/search", json={"query": "vault v100"}),
                    client.post(
                        "/v1/collections/vault/documents",
                        json={"documents": [{"id": "while-down", "text": "never stored"}]},
                    ),
                    client.get("/v1/collections/vault/documents"),
                    client.get("/v1/collections/vault/documents/before-1"),
                    client.get("/v1/collections"),
                )

        for resp in asyncio.run(data_routes()):
            _unavailable(resp)
            assert error_of(resp)["code"] == "store_unavailable"

        cluster.start()
        with replica.client() as client:
            deadline = time.monotonic() + 60
            while (ready := client.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline, f"no recovery: {ready.text}"
                time.sleep(0.2)
            assert ready.json()["connected"] is True
            assert [d["id"] for d in list_all(client, "vault")] == [d["id"] for d in written]
            for doc in written:
                got = client.get(f"/v1/collections/vault/documents/{doc['id']}")
                assert got.status_code == 200 and got.json()["text"] == doc["text"]
            assert client.get("/v1/collections/vault/documents/while-down").status_code == 404
            after = {"id": "after", "text": "Entry after: the vault number is a900."}
            upsert(client, [after], "vault")
            hits = search(client, "vault number a900", "vault", top_k=1)
            assert [h["document_id"] for h in hits] == ["after"]
            hits = search(client, "vault number v300", "vault", top_k=1)
            assert [h["document_id"] for h in hits] == ["before-3"]
            assert collection_info(client, "vault")["documents"] == len(written) + 1
    finally:
        replica.stop()
        cluster.close()


def test_replica_started_before_its_database_waits_for_it(tmp_path: Path) -> None:
    """A replica whose database is not up yet answers 503 (saying it waits for the
    database) and comes up by itself once the database starts."""
    cluster = PgCluster()
    url = cluster.create_database()
    cluster.stop()
    replica = Replica(tmp_path / "data", url)
    try:
        replica.start()
        deadline = time.monotonic() + 120
        with replica.client() as client:
            while True:  # the model loads first, then the engine keeps retrying
                try:
                    ready = client.get("/ready")
                    if "waiting for the database" in ready.text:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "never said it waits for the database"
                time.sleep(0.2)
            _unavailable(ready)
            _unavailable(client.get("/v1/collections"))
            cluster.start()
            while (ready := client.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline, f"no recovery: {ready.text}"
                time.sleep(0.2)
            upsert(client, [{"id": "first", "text": "The first entry after the wait."}], "kb")
            assert [d["id"] for d in list_all(client, "kb")] == ["first"]
    finally:
        replica.stop()
        cluster.close()
