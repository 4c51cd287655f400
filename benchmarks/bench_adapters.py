"""D1/D2: adapters in the running service (local backend, bundled SmolLM2 on CPU).

* D1: chat throughput with requests alternating two adapters and the base, against all base
  (same prompts, greedy, 8 clients). In-process, the two ways of serving mixed adapters are
  also timed on the same prompts: switching with ``set_adapter`` one request at a time (what the
  service does) and one batched ``generate`` with per-row ``adapter_names``.
* D2: an adapter is loaded while 16 chats stream: failed requests (must be 0), load time, and
  the longest gap between stream chunks while it loaded.
"""

from __future__ import annotations

import argparse
import asyncio
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
                            # for its turn on the (one-at-a-time) local model is not a gap.
                            if generating:
                                gaps.append(now - last)
                            generating = (
                                generating
                                or ('"content": "' in line
                                and ('"content": ""' not in line))
                            )
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


def in_process_modes(base: Path, root: Path, tokens: int) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), root / "alpha", adapter_name="alpha"
    )
    model.load_adapter(root / "beta", adapter_name="beta")
    model.eval()
    names = ["alpha", "__base__", "beta"] * 2
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % 4]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in range(len(names))
    ]
    kwargs = {
        "max_new_tokens": tokens,
        "min_new_tokens": tokens,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "pad_token_id": tok.eos_token_id,
    }
    with torch.inference_mode():
        started = time.perf_counter()
        for name, text in zip(names, texts, strict=True):
            ids = tok(text, return_tensors="pt")
            if name == "__base__":
                with model.disable_adapter():
                    model.generate(**ids, **kwargs)
            else:
                model.set_adapter(name)
                model.generate(**ids, **kwargs)
        sequential = time.perf_counter() - started
        batch = tok(texts, return_tensors="pt", padding=True)
        started = time.perf_counter()
        model.generate(**batch, adapter_names=names, **kwargs)
        batched = time.perf_counter() - started
    total = tokens * len(names)
    return {
        "requests": len(names),
        "tokens_each": tokens,
        "set_adapter_sequential_tokens_per_s": round(total / sequential, 2),
        "adapter_names_batched_tokens_per_s": round(total / batched, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--streams", type=int, default=16)
    args = parser.parse_args()

    from rag_service.backends.local import materialize_bundled_model

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        base = materialize_bundled_model(data / "models")
        adapters = Path(tmp) / "adapters"
        make_adapters(base, adapters)
        env = {"RAG_BACKEND": "local", "RAG_ADAPTERS_DIR": str(adapters)}
        with Server(data, env) as server:
            for name in ("alpha", "beta"):
                httpx.post(
                    server.url + "/v1/adapters", json={"name": name, "path": name}, timeout=120
                ).raise_for_status()
            mixed_models: list[str | None] = ["alpha", None, "beta"] * (args.requests // 3)
            base_only: list[str | None] = [None] * len(mixed_models)
            asyncio.run(_run(server.url, [None, "alpha"], args.tokens, 2))  # warm up
            all_base = asyncio.run(_run(server.url, base_only, args.tokens, args.clients))
            mixed = asyncio.run(_run(server.url, mixed_models, args.tokens, args.clients))
            d2 = asyncio.run(_d2(server.url, args.streams, args.tokens))
        modes = in_process_modes(base, adapters, args.tokens)
    write_result(
        "d1_d2_adapters",
        vars(args),
        {
            "d1_throughput": {
                "all_base": all_base,
                "alternating_two_adapters_and_base": mixed,
                "mixed_over_base_tokens_per_s": round(
                    mixed["tokens_per_s"] / all_base["tokens_per_s"], 3
                ),
            },
            "d1_serving_modes_in_process": modes,
            "d2_load_during_streams": d2,
        },
    )


if __name__ == "__main__":
    main()
