"""A stand-in for an external LLM server: a real HTTP server on loopback that speaks the
OpenAI chat protocol (JSON and SSE), records what it receives and misbehaves on request."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream

MODEL = "fake-llm"


@dataclass
class FakeUpstream:
    url: str = ""
    # ok | slow | error400 | error500 | bad_json | truncated_json | odd_json | bad_sse_first
    # | bad_sse_mid | talk_after_done | truncated_sse | empty_sse | no_done
    mode: str = "ok"
    bad_data: bytes = b"{this is not json"  # what odd_json, bad_sse_first, bad_sse_mid send
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    reply: str = "Paris is the capital of France [1]."
    repeat: int = 1
    requests: list[dict[str, Any]] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)  # client port of each chat request
    streams_started: int = 0
    streams_finished: int = 0  # sent everything
    streams_aborted: int = 0  # the client went away first
    loras: dict[str, str] = field(default_factory=dict)  # vLLM runtime LoRA: name -> path
    lora_calls: list[tuple[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.mode, self.delay_s, self.chunk_delay_s = "ok", 0.0, 0.0
        self.reply, self.repeat = "Paris is the capital of France [1].", 1
        self.bad_data = b"{this is not json"
        self.requests.clear()
        self.peers.clear()
        self.streams_started = self.streams_finished = self.streams_aborted = 0
        self.loras.clear()
        self.lora_calls.clear()

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", MODEL),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.reply},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        }

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        self.streams_started += 1
        words = (self.reply + " ") * self.repeat
        pieces = [w + " " for w in words.split()]
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", MODEL),
        }
        finished = False
        try:
            if self.mode == "bad_sse_first":
                yield b"data: " + self.bad_data + b"\n\n"
                return
            if self.mode == "empty_sse":  # a body that ends before any event
                return
            yield (
                b"data: "
                + json.dumps(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None,
                            }
                        ],
                    }
                ).encode()
                + b"\n\n"
            )
            for i, piece in enumerate(pieces):
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                if self.mode == "bad_sse_mid" and i == 1:
                    yield b"data: " + self.bad_data + b"\n\n"
                    return
                if self.mode == "truncated_sse" and i == 2:  # the body ends mid-answer
                    return
                yield (
                    b"data: "
                    + json.dumps(
                        {
                            **base,
                            "choices": [
                                {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                            ],
                        }
                    ).encode()
                    + b"\n\n"
                )
            yield (
                b"data: "
                + json.dumps(
                    {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                ).encode()
                + b"\n\n"
            )
            if (body.get("stream_options") or {}).get("include_usage"):
                yield (
                    b"data: "
                    + json.dumps(
                        {
                            **base,
                            "choices": [],
                            "usage": {
                                "prompt_tokens": 11,
                                "completion_tokens": 7,
                                "total_tokens": 18,
                            },
                        }
                    ).encode()
                    + b"\n\n"
                )
            if self.mode != "no_done":  # some servers end the body after the last chunk
                yield b"data: [DONE]\n\n"
            finished = True
            if self.mode == "talk_after_done":  # a broken server that never ends its body
                for _ in range(100):
                    await asyncio.sleep(0.1)
                    yield b": still here\n\n"
        finally:
            if finished:
                self.streams_finished += 1
            else:
                self.streams_aborted += 1

    def app(self) -> Litestar:
        fake = self

        @get("/v1/models", sync_to_thread=False)
        def models() -> dict[str, Any]:
            data = [{"id": MODEL, "object": "model"}]
            data += [{"id": name, "object": "model", "parent": MODEL} for name in fake.loras]
            return {"object": "list", "data": data}

        @post("/v1/load_lora_adapter", status_code=200, sync_to_thread=False)
        def load_lora(data: dict[str, Any]) -> Response[Any]:
            fake.lora_calls.append(("load", data["lora_name"]))
            if data["lora_name"] in fake.loras:
                return Response({"error": {"message": "already loaded"}}, status_code=400)
            fake.loras[data["lora_name"]] = data["lora_path"]
            return Response(f"Success: LoRA adapter '{data['lora_name']}' added successfully.")

        @post("/v1/unload_lora_adapter", status_code=200, sync_to_thread=False)
        def unload_lora(data: dict[str, Any]) -> Response[Any]:
            fake.lora_calls.append(("unload", data["lora_name"]))
            if fake.loras.pop(data["lora_name"], None) is None:
                return Response({"error": {"message": "not found"}}, status_code=404)
            return Response("Success")

        @post("/v1/chat/completions", status_code=200)
        async def chat(request: Request[Any, Any, Any]) -> Any:
            body = await request.json()
            fake.requests.append(body)
            fake.peers.append(request.client.port if request.client else 0)
            if fake.delay_s:
                await asyncio.sleep(fake.delay_s)
            if fake.mode == "error400":
                return Response(
                    {
                        "error": {
                            "message": "max_tokens is too large",
                            "type": "invalid_request_error",
                            "param": "max_tokens",
                            "code": None,
                        }
                    },
                    status_code=400,
                )
            if fake.mode == "error500":
                return Response({"error": {"message": "CUDA out of memory"}}, status_code=500)
            if fake.mode == "bad_json":
                return Response(b"<html>oops</html>", media_type="text/html")
            if fake.mode == "truncated_json":  # a well-framed body cut mid-object
                whole = json.dumps(fake._completion(body)).encode()
                return Response(whole[: len(whole) // 2], media_type="application/json")
            if fake.mode == "odd_json":
                return Response(fake.bad_data, media_type="application/json")
            if body.get("model") not in (MODEL, None, *fake.loras):
                return Response(
                    {
                        "error": {
                            "message": f"model {body.get('model')} not found",
                            "type": "NotFoundError",
                            "code": 404,
                        }
                    },
                    status_code=404,
                )
            if body.get("stream"):
                return Stream(fake._events(body), media_type="text/event-stream")
            return Response(fake._completion(body))

        return Litestar([models, chat, load_lora, unload_lora])


@contextmanager
def serve_fake(port: int) -> Iterator[FakeUpstream]:
    fake = FakeUpstream(url=f"http://127.0.0.1:{port}/v1")
    server = uvicorn.Server(
        uvicorn.Config(fake.app(), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(fake.url + "/models", timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main() -> None:
    """``python -m tests.fake_upstream PORT``: serve the fake until killed (benchmarks)."""
    import sys

    port = int(sys.argv[1])
    fake = FakeUpstream(url=f"http://127.0.0.1:{port}/v1")
    uvicorn.run(fake.app(), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
