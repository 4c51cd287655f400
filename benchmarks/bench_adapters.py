"""D1/D2: adapters in the running service (local backend, bundled SmolLM2 on CPU).

* D1: chat throughput with requests alternating two adapters and the base, against all base
  (same prompts, greedy, 8 clients), for each way the local backend can serve mixed adapters:
  ``serial`` (one request at a time, ``set_adapter`` before each: RAG_GENERATION_BATCH_SIZE=1),
  ``switch`` (batches of one adapter each, ``set_adapter`` per batch) and ``rows`` (batches
  mixing adapters through PEFT's per-row ``adapter_names``). The default is the fastest.
* D2: an adapter is loaded while 16 chats stream: failed requests (must be 0), load time, and
  the longest gap between stream chunks while it loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Server, write_result

PROMPTS = [
    "Name three colours of the rainbow.",
    "What is a prime number?",
    "Give a synonym for happy.",
    "What do bees make?",
]


def make_adapters(base: Path, root: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i, name in enumerate(("alpha", "beta", "gamma")):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base)
        peft = get_peft_model(
            model,
            LoraConfig(
                r=16,
                lora_alpha=32,
                target_modules="all-linear",
                init_lora_weights=False,
                task_type="CAUSAL_LM",
            ),
        )
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        peft.save_pretrained(root / name)


async def _run(url: str, models: list[str | None], tokens: int, clients: int) -> dict[str, Any]:
    queue = list(enumerate(models))
    done = 0
    generated = 0

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def worker() -> None:
            nonlocal done, generated
            while queue:
                i, model = queue.pop()
                body = {
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": tokens,
                    "temperature": 0,
                    "rag": {"enabled": False},
                }
                if model:
                    body["model"] = model
                resp = await client.post("/v1/chat/completions", json=body)
                resp.raise_for_status()
                generated += resp.json()["usage"]["completion_tokens"]
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        wall = time.perf_counter() - started
    return {
        "requests": done,
        "tokens": generated,
        "seconds": round(wall, 2),
        "requests_per_s": round(done / wall, 3),
        "tokens_per_s": round(generated / wall, 2),
    }


async def _d2(url: str, streams: int, tokens: int) -> dict[str, Any]:
    failures = 0
    gaps: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def stream(i: int) -> None:
            nonlocal failures
            body = {
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
                "model": "alpha" if i % 2 else None,
                "rag": {"enabled": False},
            }
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    if resp.status_code != 200:
                        failures += 1
                        return
                    last, ok, generating = time.perf_counter(), False, False
                    async for line in resp.aiter_lines():
                        now = time.perf_counter()
                        if line.startswith("data: "):
                            # Gaps between tokens of a stream that is generating; the wait
                            # for its batch to start on the local model is not a gap.
                            if generating:
                                gaps.append(now - last)
                            if not generating and line.startswith("data: {"):
                                choices = json.loads(line[6:]).get("choices") or [{}]
                                generating = bool(choices[0].get("delta", {}).get("content"))
                            last = now
                            ok = ok or line == "data: [DONE]"
                    failures += not ok
            except httpx.HTTPError:
                failures += 1

        tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
        await asyncio.sleep(2.0)  # streams are running
        started = time.perf_counter()
        resp = await client.post("/v1/adapters", json={"name": "gamma", "path": "gamma"})
        load_s = time.perf_counter() - started
        await asyncio.gather(*tasks)
    return {
        "streams": streams,
        "failed": failures,
        "load_status": resp.status_code,
        "load_seconds": round(load_s, 3),
        "max_token_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
    }


MODES: dict[str, dict[str, str]] = {
    "serial": {"RAG_GENERATION_BATCH_SIZE": "1", "RAG_ADAPTER_MIXING": "switch"},
    "switch": {"RAG_ADAPTER_MIXING": "switch"},
    "rows": {"RAG_ADAPTER_MIXING": "rows"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()

    from rag_service.model_cache import materialize_bundled_model
    from rag_service.settings import Settings

    default_mode = Settings().adapter_mixing
    d1: dict[str, Any] = {}
    d2: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        base = materialize_bundled_model(data / "models")
        adapters = Path(tmp) / "adapters"
        make_adapters(base, adapters)
        mixed_models: list[str | None] = ["alpha", None, "beta"] * (args.requests // 3)
        base_only: list[str | None] = [None] * len(mixed_models)
        for mode in args.modes:
            env = {"RAG_BACKEND": "local", "RAG_ADAPTERS_DIR": str(adapters), **MODES[mode]}
            fresh = Path(tmp) / f"data-{mode}"  # no adapter registry from the last mode
            fresh.mkdir()
            (fresh / "models").symlink_to(data / "models")
            with Server(fresh, env) as server:
                for name in ("alpha", "beta"):
                    httpx.post(
                        server.url + "/v1/adapters", json={"name": name, "path": name}, timeout=120
                    ).raise_for_status()
                asyncio.run(_run(server.url, [None, "alpha"], args.tokens, 2))  # warm up
                all_base = asyncio.run(_run(server.url, base_only, args.tokens, args.clients))
                mixed = asyncio.run(_run(server.url, mixed_models, args.tokens, args.clients))
                d1[mode] = {
                    "all_base": all_base,
                    "alternating_two_adapters_and_base": mixed,
                    "mixed_over_base_tokens_per_s": round(
                        mixed["tokens_per_s"] / all_base["tokens_per_s"], 3
                    ),
                }
                if mode == default_mode:
                    d2 = asyncio.run(_d2(server.url, args.streams, args.tokens))
    mixed_rates = {m: r["alternating_two_adapters_and_base"]["tokens_per_s"] for m, r in d1.items()}
    write_result(
        "d1_d2_adapters",
        vars(args),
        {
            "d1_throughput": d1,
            "d1_mixed_tokens_per_s": mixed_rates,
            "d1_fastest_mixed_mode": max(mixed_rates, key=mixed_rates.__getitem__),
            "default_mode": default_mode,
            "d2_load_during_streams": d2,
        },
    )


if __name__ == "__main__":
    main()
