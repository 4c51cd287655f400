"""The local backend's batch generator on the bundled model: rows of different lengths and
adapters generated together equal each generated alone; per-row limits, cancel, batch keys."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from rag_service.backends.generation import GenerationRequest, GenerationResult
from rag_service.backends.local import LocalBackend
from rag_service.settings import Settings
from tests.test_adapters import make_adapter

PROMPTS = [
    "Name three colours of the rainbow.",
    "What is the capital of France? Answer in one word.",
    "Say hello.",
    "Write one sentence about the sea and the ships that sail on it at night.",
]


@pytest.fixture(scope="module")
def backend(bundled_model_dir, tmp_path_factory) -> LocalBackend:
    root: Path = tmp_path_factory.mktemp("gen-adapters")
    backend = LocalBackend(
        Settings(local_model=str(bundled_model_dir), generation_batch_wait_ms=200)
    )
    asyncio.run(backend.start())
    for name, seed in (("alpha", 11), ("beta", 12)):
        make_adapter(bundled_model_dir, root / name, seed=seed)
        asyncio.run(backend.load_adapter(name, str(root / name), 1))
    yield backend
    asyncio.run(backend.close())


def request(prompt: str, adapter: str | None, **kw) -> tuple[GenerationRequest, dict]:
    box: dict = {"texts": []}
    finished = threading.Event()

    def done(outcome: GenerationResult | BaseException) -> None:
        box["outcome"] = outcome
        finished.set()

    box["finished"] = finished
    kw.setdefault("max_new_tokens", 16)
    req = GenerationRequest(
        messages=[{"role": "user", "content": prompt}],
        adapter=adapter,
        on_text=box["texts"].append,
        on_done=done,
        **kw,
    )
    return req, box


def run_together(backend: LocalBackend, reqs: list[tuple[GenerationRequest, dict]]) -> list:
    for req, _ in reqs:
        backend.generator.submit(req)
    for _, box in reqs:
        assert box["finished"].wait(300)
    return [box["outcome"] for _, box in reqs]


@pytest.mark.parametrize("mixing", ["rows", "switch"])
def test_batched_rows_equal_each_row_alone(backend, mixing):
    previous, backend.generator.mixing = backend.generator.mixing, mixing
    adapters = ["alpha", None, "beta", "alpha"]
    alone = [
        run_together(backend, [request(p, a)])[0] for p, a in zip(PROMPTS, adapters, strict=True)
    ]
    before = backend.generator.batches
    reqs = [request(p, a) for p, a in zip(PROMPTS, adapters, strict=True)]
    together = run_together(backend, reqs)
    # rows: one batch mixing three adapters; switch: one batch per adapter.
    assert backend.generator.batches - before == (1 if mixing == "rows" else 3)
    for one, many, (_, box) in zip(alone, together, reqs, strict=True):
        assert isinstance(many, GenerationResult)
        assert many.text == one.text and many.text
        assert "".join(box["texts"]) == many.text  # what was streamed is the answer
        assert many.completion_tokens == one.completion_tokens
        assert many.prompt_tokens == one.prompt_tokens
    assert len({r.text for r in together}) >= 3  # adapters changed the answers
    backend.generator.mixing = previous


def test_per_row_token_limits_and_cancel(backend):
    short, short_box = request(PROMPTS[3], "alpha", max_new_tokens=3)
    long, long_box = request(PROMPTS[3], "alpha", max_new_tokens=20)
    gone, gone_box = request(PROMPTS[3], "alpha", max_new_tokens=20)
    before = backend.generator.batches

    def cancel_after_first_text(text: str, _orig=gone.on_text) -> None:
        _orig(text)
        gone.cancel.set()

    gone.on_text = cancel_after_first_text
    seen_when_short_done: list[int] = []

    def short_done(outcome, _orig=short.on_done) -> None:
        seen_when_short_done.append(len(long_box["texts"]))
        _orig(outcome)

    short.on_done = short_done
    results = run_together(backend, [(short, short_box), (long, long_box), (gone, gone_box)])
    assert backend.generator.batches == before + 1  # one batch, rows stopping on their own
    assert (results[0].completion_tokens, results[0].finish_reason) == (3, "length")
    assert (results[1].completion_tokens, results[1].finish_reason) == (20, "length")
    assert results[2].completion_tokens < 5  # stopped at its next token
    # The short row was answered as soon as it finished, while the long one still generated.
    assert seen_when_short_done[0] < len(long_box["texts"])


def test_batch_keys():
    def key(**kw):
        req, _ = request("x", kw.pop("adapter", None), **kw)
        return req.batch_key("rows")

    assert key() == key(adapter="alpha")  # greedy rows mix adapters
    assert key(temperature=0.7) != key()
    assert key(temperature=0.7, top_p=0.9) != key(temperature=0.7)
    assert key(stop=("\n",)) != key()
    seeded = [request("x", None, seed=1)[0] for _ in range(2)]
    assert seeded[0].batch_key("rows") != seeded[1].batch_key("rows")  # each runs alone
    req, _ = request("x", "alpha")
    other, _ = request("x", None)
    assert req.batch_key("switch") != other.batch_key("switch")
