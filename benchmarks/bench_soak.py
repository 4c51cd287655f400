"""S1: soak, a mixed load held for minutes against one service process.

The service runs as users run it (``rag-service serve`` in a child process) with the upstream
backend pointed at the fake OpenAI server (``tests/fake_upstream.py``, a real HTTP server on
loopback). A collection is seeded with the Debian FAQ answers, one document per paragraph.
Then ``--clients`` clients (one httpx.AsyncClient each) loop until ``--duration`` is up, each
drawing its next request from a weighted mix (``--mix``):

* ``upsert``: a batch of documents whose ids come from a small fixed pool (``--pool``), each
  with one of a few texts and metadata, so the same ids are created once and then replaced
  (``updated``) or re-posted as they are (``unchanged``) over and over, by many clients at once;
* ``search_dense``, ``search_hybrid``, with and without a metadata filter (``*_filter``);
* ``chat`` and ``chat_stream``: RAG chats, the stream read to its ``[DONE]``.

Recorded: requests and errors per route (an error is a transport error, a status outside 2xx,
an error event inside a stream or a stream without ``[DONE]``; the first bodies are kept),
p50/p99 latency per route after ``--warmup``, throughput, the server's RSS every second (at
start, after warm-up, at the end, and its growth over the second half of the run against the
first half: a leak grows as fast in both), and the event-loop lag the service reports on
/metrics (its maximum, and the share of 10 ms timer ticks that ran over 50 / 100 ms during the
run). Exits non-zero when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from benchmarks.common import Server, fake_upstream, faq_pairs, percentiles, write_result

COLLECTION = "soak"
SHARDS = ("a", "b", "c", "d")
ROUTES = (
    "upsert",
    "search_dense",
    "search_hybrid",
    "search_dense_filter",
    "search_hybrid_filter",
    "chat",
    "chat_stream",
)
DEFAULT_MIX = (
    "upsert=2,search_dense=3,search_hybrid=2,search_dense_filter=2,search_hybrid_filter=2,"
    "chat=2,chat_stream=2"
)
MAX_ERROR_SAMPLES = 10

Operation = Callable[[httpx.AsyncClient, random.Random], Awaitable[str | None]]
MIB = 1024 * 1024


@dataclass(frozen=True)
class Corpus:
    seed: list[dict[str, Any]]  # documents posted before the load
    variants: list[list[str]]  # per pool id: the texts it cycles through
    questions: list[str]


def build_corpus(pool: int, variants: int) -> Corpus:
    """Debian FAQ answers split into paragraphs (documents) and its questions (queries)."""
    pairs = faq_pairs()
    paragraphs = [
        (anchor, j, text)
        for anchor, _, answer in pairs
        for j, text in enumerate(answer.split("\n"))
        if len(text) >= 40
    ]
    seed = [
        {
            "id": f"faq-{anchor}-{j}",
            "text": text,
            "metadata": {"topic": anchor, "shard": SHARDS[i % len(SHARDS)]},
        }
        for i, (anchor, j, text) in enumerate(paragraphs)
    ]
    texts = [text for _, _, text in paragraphs]
    step = max(1, len(texts) // (pool * variants))
    pool_texts = [
        [texts[((k * variants + v) * step) % len(texts)] for v in range(variants)]
        for k in range(pool)
    ]
    return Corpus(seed=seed, variants=pool_texts, questions=[q for _, q, _ in pairs])


@dataclass
class Route:
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, after the warm-up


@dataclass
class Tally:
    """What the clients saw; one event loop writes it, so no lock."""

    routes: dict[str, Route] = field(default_factory=dict)
    error_samples: list[dict[str, Any]] = field(default_factory=list)
    upsert_statuses: Counter[str] = field(default_factory=Counter)
    chats_without_sources: int = 0

    def record(
        self, route: str, seconds: float, problem: str | None, at_s: float, measured: bool
    ) -> None:
        r = self.routes.setdefault(route, Route())
        r.requests += 1
        if problem is not None:
            r.errors += 1
            if len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples.append(
                    {"route": route, "at_s": round(at_s, 2), "error": problem[:500]}
                )
        elif measured:
            r.latencies.append(seconds)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.routes.values())

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.routes.values())


def _failure(resp: httpx.Response) -> str | None:
    if 200 <= resp.status_code < 300:
        return None
    return f"HTTP {resp.status_code}: {resp.text}"


@dataclass
class Workload:
    corpus: Corpus
    batch: int
    tally: Tally

    async def upsert(self, http: httpx.AsyncClient, rng: random.Random) -> str | None:
        ids = rng.sample(range(len(self.corpus.variants)), self.batch)
        documents = [
            {
                "id": f"pool-{k}",
                "text": rng.choice(self.corpus.variants[k]),
                "metadata": {"shard": SHARDS[k % len(SHARDS)], "edition": rng.randrange(2)},
            }
            for k in ids
        ]
        resp = await http.post(
            f"/v1/collections/{COLLECTION}/documents", json={"documents": documents}
        )
        if (problem := _failure(resp)) is not None:
            return problem
        self.tally.upsert_statuses.update(d["status"] for d in resp.json()["documents"])
        return None

    async def _search(
        self, http: httpx.AsyncClient, rng: random.Random, mode: str, filtered: bool
    ) -> str | None:
        body: dict[str, Any] = {
            "query": rng.choice(self.corpus.questions),
            "top_k": 10,
            "mode": mode,
        }
        if filtered:
            body["filter"] = (
                {"shard": rng.choice(SHARDS)}
                if mode == "dense"
                else {"shard": {"$in": rng.sample(SHARDS, 2)}}
            )
        resp = await http.post(f"/v1/collections/{COLLECTION}/search", json=body)
        return _failure(resp)

    async def search_dense(self, http: httpx.AsyncClient, rng: random.Random) -> str | None:
        return await self._search(http, rng, "dense", False)

    async def search_hybrid(self, http: httpx.AsyncClient, rng: random.Random) -> str | None:
        return await self._search(http, rng, "hybrid", False)

    async def search_dense_filter(self, http: httpx.AsyncClient, rng: random.Random) -> str | None:
        return await self._search(http, rng, "dense", True)

    async def search_hybrid_filter(self, http: httpx.AsyncClient, rng: random.Random) -> str | None:
        return await self._search(http, rng, "hybrid", True)

    def _chat_body(self, rng: random.Random, stream: bool) -> dict[str, Any]:
        return {
            "model": "fake-llm",
            "stream": stream,
            "max_tokens": 32,
            "messages": [{"role": "user", "content": rng.choice(self.corpus.questions)}],
            "rag": {"collection": COLLECTION, "top_k": 4, "mode": rng.choice(("dense", "hybrid"))},
        }

    async def chat(self, http: httpx.AsyncClient, rng: random.Random) -> str | None:
        resp = await http.post("/v1/chat/completions", json=self._chat_body(rng, False))
        if (problem := _failure(resp)) is not None:
            return problem
        if not resp.json().get("sources"):
            self.tally.chats_without_sources += 1
        return None

    async def chat_stream(self, http: httpx.AsyncClient, rng: random.Random) -> str | None:
        body = self._chat_body(rng, True)
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if not 200 <= resp.status_code < 300:
                await resp.aread()
                return _failure(resp)
            first = True
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    return None
                if data.startswith('{"error"'):
                    return f"stream error event: {data}"
                if first:
                    first = False
                    if '"sources":[]' in data or '"sources"' not in data:
                        self.tally.chats_without_sources += 1
        return "stream ended without [DONE]"

    def operations(self) -> dict[str, Operation]:
        return {name: getattr(self, name) for name in ROUTES}


def parse_mix(spec: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in ROUTES:
            raise argparse.ArgumentTypeError(f"--mix: unknown route {name!r}; known: {ROUTES}")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix: weight of {name!r} is not a number") from None
        if mix[name] < 0:
            raise argparse.ArgumentTypeError(f"--mix: weight of {name!r} is negative")
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("--mix: all weights are 0")
    return mix


@dataclass
class LoopLag:
    """The service's own event-loop monitor, read from /metrics."""

    max_s: float
    count: float  # timer ticks observed so far
    buckets: dict[float, float]  # le -> cumulative count

    @classmethod
    def parse(cls, text: str) -> LoopLag:
        max_s, count, buckets = 0.0, 0.0, {}
        for line in text.splitlines():
            if line.startswith("rag_event_loop_lag_max_seconds "):
                max_s = float(line.split()[-1])
            elif line.startswith("rag_event_loop_lag_seconds_count "):
                count = float(line.split()[-1])
            elif m := re.match(r'rag_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', line):
                buckets[float(m.group(1))] = float(m.group(2))
        return cls(max_s, count, buckets)

    def over(self, seconds: float) -> float:
        """Ticks that ran later than ``seconds`` (a bucket bound)."""
        return self.count - self.buckets.get(seconds, self.count)


@dataclass
class Sample:
    at_s: float
    rss: int
    lag_max_s: float | None


async def _client(
    i: int,
    url: str,
    ops: dict[str, Operation],
    mix: dict[str, float],
    args: argparse.Namespace,
    tally: Tally,
    t0: float,
) -> None:
    rng = random.Random(args.seed * 1000 + i)
    names, weights = list(mix), list(mix.values())
    deadline, warm_until = t0 + args.duration, t0 + args.warmup
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        base_url=url, timeout=args.timeout, limits=limits, trust_env=False
    ) as http:
        while (now := time.monotonic()) < deadline:
            route = rng.choices(names, weights)[0]
            started = time.perf_counter()
            try:
                problem = await ops[route](http, rng)
            except (httpx.HTTPError, ValueError, KeyError) as exc:  # transport, bad body
                problem = f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - started
            tally.record(route, seconds, problem, now - t0, measured=now >= warm_until)


async def _sampler(
    url: str,
    pid: int,
    stop: asyncio.Event,
    t0: float,
    samples: list[Sample],
    tally: Tally,
    args: argparse.Namespace,
) -> None:
    """Every second: the server's RSS and its event-loop lag maximum; a progress line every 10."""
    proc = psutil.Process(pid)
    next_report = 10.0
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
        while not stop.is_set():
            at = time.monotonic() - t0
            rss = proc.memory_info().rss
            lag: float | None = None
            started = time.perf_counter()
            try:
                resp = await http.get("/metrics")
                problem = _failure(resp)
                if problem is None:
                    lag = LoopLag.parse(resp.text).max_s
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - started
            tally.record("metrics", seconds, problem, at, measured=at >= args.warmup)
            samples.append(Sample(at, rss, lag))
            if at >= next_report:
                next_report += 10.0
                print(
                    f"  {at:5.0f}/{args.duration:.0f} s  requests {tally.requests}  errors "
                    f"{tally.errors}  rss {rss / MIB:.0f} MiB  loop lag max "
                    f"{(lag or 0) * 1000:.0f} ms",
                    flush=True,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


def rss_near(samples: list[Sample], at_s: float, half_width: float = 2.5) -> float:
    """Median RSS (MiB) of the samples within ``half_width`` seconds of ``at_s``."""
    near = [s.rss for s in samples if abs(s.at_s - at_s) <= half_width]
    if not near:
        near = [min(samples, key=lambda s: abs(s.at_s - at_s)).rss]
    return float(np.median(near)) / MIB


def rss_figures(samples: list[Sample], ready_rss: int, warmup: float) -> dict[str, Any]:
    """RSS at ready (before seeding), at the start of the load, after the warm-up, at the end
    (medians over a few seconds, bar the start: the load ramps up at once) and its growth over
    each half of the load."""
    end = samples[-1].at_s
    mid = end / 2
    start_mib = samples[0].rss / MIB
    mid_mib, end_mib = rss_near(samples, mid), rss_near(samples, end)
    first, last = mid_mib - start_mib, end_mib - mid_mib
    late = [s for s in samples if s.at_s >= mid]
    slope = (
        float(np.polyfit([s.at_s for s in late], [s.rss / MIB for s in late], 1)[0]) * 60
        if len(late) >= 3
        else 0.0
    )
    # Flattening: the second half grows at most half as much as the first (a leak grows alike
    # in both), or by no more than 1% of the starting RSS (noise).
    flattens = last <= max(first / 2, 0.01 * start_mib)
    step = max(1, len(samples) // 36)
    return {
        "rss_ready_mib": round(ready_rss / MIB, 1),
        "rss_start_mib": round(start_mib, 1),
        "rss_after_warmup_mib": round(rss_near(samples, warmup), 1),
        "rss_end_mib": round(end_mib, 1),
        "rss_peak_mib": round(max(s.rss for s in samples) / MIB, 1),
        "rss_growth_first_half_mib": round(first, 1),
        "rss_growth_last_half_mib": round(last, 1),
        "rss_slope_last_half_mib_per_min": round(slope, 2),
        "rss_flattens": flattens,
        "rss_flattens_rule": "last-half growth <= max(first-half growth / 2, 1% of start RSS)",
        "rss_series_mib": {f"{s.at_s:.0f}": round(s.rss / MIB, 1) for s in samples[::step]},
    }


async def soak(
    url: str, pid: int, ready_rss: int, args: argparse.Namespace, corpus: Corpus
) -> dict[str, Any]:
    tally = Tally()
    workload = Workload(corpus, args.batch, tally)
    ops = workload.operations()
    mix = parse_mix(args.mix)
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
        lag_before = LoopLag.parse((await http.get("/metrics")).raise_for_status().text)
    stop = asyncio.Event()
    t0 = time.monotonic()
    sampler = asyncio.create_task(_sampler(url, pid, stop, t0, samples, tally, args))
    await asyncio.gather(*(_client(i, url, ops, mix, args, tally, t0) for i in range(args.clients)))
    wall = time.monotonic() - t0
    stop.set()
    await sampler
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
        lag_after = LoopLag.parse((await http.get("/metrics")).raise_for_status().text)
    samples.append(Sample(wall, psutil.Process(pid).memory_info().rss, lag_after.max_s))

    measured = wall - args.warmup
    routes: dict[str, Any] = {}
    for name in [*ROUTES, "metrics"]:
        r = tally.routes.get(name, Route())
        routes[name] = {
            "requests": r.requests,
            "errors": r.errors,
            "ok_per_s_after_warmup": round(len(r.latencies) / measured, 2),
            "latency": percentiles(r.latencies) if r.latencies else None,
        }
    ticks = lag_after.count - lag_before.count
    loop = {
        # The service's gauge covers everything since it became ready, seeding included.
        "event_loop_lag_max_ms": round(lag_after.max_s * 1000, 2),
        "event_loop_lag_max_ms_before_load": round(lag_before.max_s * 1000, 2),
        "event_loop_lag_max_during_load": lag_after.max_s > lag_before.max_s,
        "event_loop_ticks": int(ticks),
        "event_loop_ticks_over_50ms": int(lag_after.over(0.05) - lag_before.over(0.05)),
        "event_loop_ticks_over_100ms": int(lag_after.over(0.1) - lag_before.over(0.1)),
    }
    measured_requests = sum(len(tally.routes[n].latencies) for n in ROUTES if n in tally.routes)
    return {
        "errors": tally.errors,
        "requests": tally.requests,
        "error_samples": tally.error_samples,
        "wall_seconds": round(wall, 2),
        "requests_per_s_after_warmup": round(measured_requests / measured, 2),
        "routes": routes,
        "upsert_statuses": dict(tally.upsert_statuses),
        "chats_without_sources": tally.chats_without_sources,
        **loop,
        **rss_figures(samples, ready_rss, args.warmup),
    }


def seed(url: str, corpus: Corpus, batch: int = 64) -> dict[str, Any]:
    started = time.perf_counter()
    chunks = 0
    with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
        for i in range(0, len(corpus.seed), batch):
            resp = http.post(
                f"/v1/collections/{COLLECTION}/documents",
                json={"documents": corpus.seed[i : i + batch]},
            )
            resp.raise_for_status()
            chunks += sum(d["chunks"] for d in resp.json()["documents"])
    return {
        "seed_documents": len(corpus.seed),
        "seed_chunks": chunks,
        "seed_seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument(
        "--warmup", type=float, default=15.0, help="first seconds left out of the latencies"
    )
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--mix", default=DEFAULT_MIX, help="route=weight,... for each request")
    parser.add_argument("--pool", type=int, default=16, help="document ids the upserts reuse")
    parser.add_argument("--variants", type=int, default=3, help="texts each pool id cycles")
    parser.add_argument("--batch", type=int, default=4, help="documents per upsert")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the clients")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be >= 0 and shorter than --duration")
    if not 1 <= args.batch <= args.pool:
        parser.error("--batch must be between 1 and --pool")
    try:
        parse_mix(args.mix)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))

    corpus = build_corpus(args.pool, args.variants)
    with fake_upstream() as fake_url, tempfile.TemporaryDirectory() as tmp:
        env = {"RAG_UPSTREAM_URL": fake_url, "RAG_UPSTREAM_MODEL": "fake-llm"}
        with Server(Path(tmp), env) as server:
            assert server.proc is not None
            ready_rss = psutil.Process(server.proc.pid).memory_info().rss
            figures: dict[str, Any] = {"ready_seconds": round(server.ready_seconds, 2)}
            figures |= seed(server.url, corpus)
            print(
                f"seeded {figures['seed_documents']} documents; {args.clients} clients for "
                f"{args.duration:.0f} s",
                flush=True,
            )
            figures |= asyncio.run(soak(server.url, server.proc.pid, ready_rss, args, corpus))
    write_result("s1_soak", vars(args), figures)
    if figures["errors"]:
        print(f"{figures['errors']} of {figures['requests']} requests failed")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
