"""Concurrent writers and readers against a real server."""

from __future__ import annotations

import asyncio

import httpx

from rag_service.settings import Settings
from tests.support import free_port, running_server


def _version_doc(version: int) -> str:
    # Several chunks per version, each naming the version, so a mix is detectable.
    return " ".join(
        f"Version {version} paragraph {p}: the release train v{version} ships feature {p}."
        for p in range(40)
    )


async def _hammer(url: str) -> tuple[list[int], list[set[int]], dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await client.post(
            "/v1/collections", json={"name": "c", "chunk_tokens": 32, "chunk_overlap": 0}
        )

        async def write(v: int) -> int:
            resp = await client.post(
                "/v1/collections/c/documents",
                json={"documents": [{"id": "same", "text": _version_doc(v), "metadata": {"v": v}}]},
            )
            assert resp.status_code == 200, resp.text
            return v

        seen: list[set[int]] = []
        stop = asyncio.Event()

        async def read() -> None:
            while not stop.is_set():
                resp = await client.post(
                    "/v1/collections/c/search", json={"query": "release train feature", "top_k": 20}
                )
                results = resp.json()["results"]
                if results:
                    seen.append({r["metadata"]["v"] for r in results})
                    # Chunk text always belongs to the version in its metadata.
                    for r in results:
                        assert f"v{r['metadata']['v']} " in r["text"] or (
                            f"Version {r['metadata']['v']} " in r["text"]
                        )

        readers = [asyncio.create_task(read()) for _ in range(3)]
        written = await asyncio.gather(*[write(v) for v in range(1, 7)])
        stop.set()
        await asyncio.gather(*readers)
        doc = (await client.get("/v1/collections/c/documents/same")).json()
        final = (
            await client.post(
                "/v1/collections/c/search", json={"query": "release train", "top_k": 100}
            )
        ).json()
        coll = (await client.get("/v1/collections")).json()["data"][0]
    return written, seen, {"doc": doc, "final": final["results"], "coll": coll}


def test_concurrent_upserts_of_one_id_end_consistent(tmp_path, embedder, fake_server):
    settings = Settings(data_dir=tmp_path, port=free_port(), upstream_url=fake_server.url)
    with running_server(settings, embedder) as url:
        written, seen, state = asyncio.run(_hammer(url))
    assert sorted(written) == list(range(1, 7))
    # Readers never saw two versions of the document at once.
    assert seen and all(len(versions) == 1 for versions in seen), seen
    doc, final, coll = state["doc"], state["final"], state["coll"]
    version = doc["metadata"]["v"]
    assert doc["text"] == _version_doc(version)
    assert {r["metadata"]["v"] for r in final} == {version}
    assert len(final) == doc["chunks"] == coll["chunks"]
    assert coll["documents"] == 1
