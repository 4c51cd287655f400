"""C1-C3: chat completions overhead, concurrency and local generation speed.

* C1: with an instant fake upstream (a separate process speaking the OpenAI protocol),
  non-stream latency and stream time to first byte through the service, against the fake
  called directly plus in-process retrieval (embed the query + FAISS search) of the same query.
* C2: 64 concurrent streaming chats through the upstream backend: errors, time to first byte
  p50/p99, and the largest event-loop stall the service saw (its own lag monitor).
* C3: the local backend (bundled SmolLM2-135M-Instruct, CPU) tokens/s through HTTP against
  plain transformers ``generate`` on the same prompt, in alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from benchmarks.common import (
    Server,
    device,
    fake_upstream,
    percentiles,
    write_result,
)

DOCS = [
    {"id": f"d{i}", "text": f"Fact {i}: the meeting room {i} is on floor {i % 7}."}
    for i in range(200)
]
QUESTION = "Which floor is meeting room 42 on?"


def timed_post(client: httpx.Client, path: str, body: dict, stream: bool) -> float:
    """Latency of a whole answer, or of a stream's first body bytes. A stream is read to its
    end after that, as clients do: dropping it early would close both connections (client to
    service, and service to upstream, since a cancelled stream cannot be reused) and time
    two TCP connects per request instead of the chat path."""
    t = time.perf_counter()
    if stream:
        first = None
        with client.stream("POST", path, json=body) as resp:
            resp.raise_for_status()
            for _ in resp.iter_raw():
                if first is None:
                    first = time.perf_counter() - t
        assert first is not None, "empty stream"
        return first
    client.post(path, json=body).raise_for_status()
    return time.perf_counter() - t


def c1(server_url: str, fake_url: str, n: int) -> dict:
    import faiss
    from sentence_transformers import SentenceTransformer

    from rag_service.settings import bundled_embedding_model

    model = SentenceTransformer(bundled_embedding_model(), device=device())
    vectors = model.encode([d["text"] for d in DOCS], normalize_embeddings=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors.astype(np.float32))
    messages = [{"role": "user", "content": QUESTION}]
    body = {
        "model": "fake-llm",
        "messages": messages,
        "max_tokens": 32,
        "rag": {"collection": "bench", "top_k": 4},
    }
    direct_body = {"model": "fake-llm", "messages": messages, "max_tokens": 32}
    out: dict = {}
    with (
        httpx.Client(base_url=server_url, timeout=60) as ours,
        httpx.Client(base_url=fake_url.rsplit("/v1", 1)[0], timeout=60) as direct,
    ):
        for stream in (False, True):
            via, base = [], []
            for _ in range(5):
                timed_post(ours, "/v1/chat/completions", {**body, "stream": stream}, stream)
                timed_post(
                    direct, "/v1/chat/completions", {**direct_body, "stream": stream}, stream
                )
            for _ in range(n):
                via.append(
                    timed_post(ours, "/v1/chat/completions", {**body, "stream": stream}, stream)
                )
                t = time.perf_counter()
                index.search(model.encode([QUESTION], normalize_embeddings=True), 4)
                retrieval = time.perf_counter() - t
                base.append(
                    retrieval
                    + timed_post(
                        direct, "/v1/chat/completions", {**direct_body, "stream": stream}, stream
                    )
                )
            p_via, p_base = percentiles(via), percentiles(base)
            pairs = np.asarray(via) / np.asarray(base)  # each pair measured back to back
            out["stream_ttfb" if stream else "non_stream"] = {
                "through_service": p_via,
                "direct_plus_in_process_retrieval": p_base,
                "p50_ratio": round(p_via["p50_ms"] / p_base["p50_ms"], 3),
                "p50_of_paired_ratios": round(float(np.median(pairs)), 3),
            }
    out["target"] = "p50_ratio <= 1.2"
    return out


async def _c2(url: str, clients: int) -> dict:
    ttfb: list[float] = []
    errors = 0
    body = {
        "model": "fake-llm",
        "stream": True,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": QUESTION}],
        "rag": {"collection": "bench", "top_k": 4},
    }
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=clients)) as s:

        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                async with s.post("/v1/chat/completions", json=body) as resp:
                    if resp.status != 200:
                        errors += 1
                        return
                    first = True
                    async for line in resp.content:
                        if first:
                            ttfb.append(time.perf_counter() - t)
                            first = False
                        if line.strip() == b"data: [DONE]":
                            return
                    errors += 1  # stream ended without [DONE]
            except aiohttp.ClientError:
                errors += 1

        started = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(clients)])
        wall = time.perf_counter() - started
    return {
        "clients": clients,
        "errors": errors,
        "ttfb": percentiles(ttfb),
        "wall_seconds": round(wall, 3),
    }


def c2(url: str, clients: int, rounds: int) -> dict:
    results = [asyncio.run(_c2(url, clients)) for _ in range(rounds)]
    metrics = httpx.get(url + "/metrics").text
    lag = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("rag_event_loop_lag_max_seconds ")
    )
    ttfb = [r["ttfb"] for r in results]
    return {
        "rounds": results,
        "errors": sum(r["errors"] for r in results),
        "ttfb_p50_ms_last_round": ttfb[-1]["p50_ms"],
        "ttfb_p99_ms_last_round": ttfb[-1]["p99_ms"],
        "event_loop_max_lag_ms": round(lag * 1000, 2),
    }


def c3(tokens: int, rounds: int = 3) -> dict:
    """Plain ``generate`` and the service take turns, ``rounds`` times each, so that both see
    the same phases of a shared machine; the medians are compared."""
    import torch

    from rag_service.backends.local import LocalBackend
    from rag_service.settings import Settings

    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    kwargs = {
        "max_new_tokens": tokens,
        "min_new_tokens": tokens,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    body = {"messages": messages, "max_tokens": tokens, "temperature": 0, "rag": {"enabled": False}}
    plain_rates, served_rates, stream_rates = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "data"
        backend = LocalBackend(Settings(data_dir=cache))
        backend.load()  # converts the bundled model once, into the data dir the server uses
        ids = torch.tensor([backend.prompt_ids(messages)])
        kwargs["pad_token_id"] = backend.tokenizer.eos_token_id
        with (
            Server(cache, {"RAG_BACKEND": "local"}) as server,
            httpx.Client(base_url=server.url, timeout=600) as client,
            torch.inference_mode(),
        ):
            backend.model.generate(ids, max_new_tokens=8, do_sample=False)
            client.post("/v1/chat/completions", json={**body, "max_tokens": 8})
            for _ in range(rounds):
                t = time.perf_counter()
                out = backend.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
                plain_rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
                t = time.perf_counter()
                resp = client.post("/v1/chat/completions", json=body).json()
                served_tokens = resp["usage"]["completion_tokens"]
                served_rates.append(served_tokens / (time.perf_counter() - t))
                t = time.perf_counter()
                n_chunks = 0
                with client.stream(
                    "POST", "/v1/chat/completions", json={**body, "stream": True}
                ) as stream:
                    for line in stream.iter_lines():
                        n_chunks += line.startswith("data: {")
                stream_rates.append(served_tokens / (time.perf_counter() - t))
    plain, served = float(np.median(plain_rates)), float(np.median(served_rates))
    return {
        "plain_generate_tokens_per_s": round(plain, 2),
        "service_tokens_per_s": round(served, 2),
        "service_stream_tokens_per_s": round(float(np.median(stream_rates)), 2),
        "rounds": {
            "plain": [round(r, 2) for r in plain_rates],
            "service": [round(r, 2) for r in served_rates],
            "service_stream": [round(r, 2) for r in stream_rates],
        },
        "stream_chunks": n_chunks,
        "tokens": tokens,
        "service_vs_plain": round(served / plain, 3),
        "target": ">= 0.9",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--skip-local", action="store_true")
    args = parser.parse_args()
    figures: dict = {}
    with fake_upstream() as fake_url, tempfile.TemporaryDirectory() as tmp:
        env = {"RAG_UPSTREAM_URL": fake_url, "RAG_UPSTREAM_MODEL": "fake-llm"}
        with Server(Path(tmp), env) as server:
            httpx.post(
                server.url + "/v1/collections/bench/documents",
                json={"documents": DOCS},
                timeout=300,
            ).raise_for_status()
            figures["c1_overhead"] = c1(server.url, fake_url, args.requests)
            figures["c2_concurrency"] = c2(server.url, args.clients, args.rounds)
    if not args.skip_local:
        figures["c3_local_generation"] = c3(args.tokens)
    write_result("c1_c3_chat", vars(args), figures)


if __name__ == "__main__":
    main()
