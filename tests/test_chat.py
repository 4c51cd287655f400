"""Chat completions against the fake upstream, through the official openai SDK."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from rag_service.prompting import PromptSource, fit_prompt, retrieval_query
from rag_service.settings import Settings
from tests.fake_upstream import MODEL
from tests.support import error_of, free_port, running_server

FACTS = [
    {"id": "france", "text": "Paris is the capital of France.", "metadata": {"lang": "en"}},
    {"id": "italy", "text": "Rome is the capital of Italy.", "metadata": {"lang": "en"}},
    {"id": "zebra", "text": "Zebras have black and white stripes.", "metadata": {"lang": "en"}},
]


@pytest.fixture
def server(tmp_path, embedder, fake_upstream):
    settings = Settings(
        data_dir=tmp_path / "data",
        port=free_port(),
        upstream_url=fake_upstream.url,
        upstream_read_timeout_s=1.0,
    )
    with running_server(settings, embedder) as url:
        httpx.post(
            f"{url}/v1/collections/default/documents", json={"documents": FACTS}, timeout=60
        ).raise_for_status()
        yield url


@pytest.fixture
def sdk(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def system_prompt(body):
    return body["messages"][0]["content"]


def test_non_stream_prompt_holds_sources(sdk, fake_upstream):
    resp = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_body={"rag": {"top_k": 2}},
    )
    assert resp.choices[0].message.content == fake_upstream.reply
    assert resp.object == "chat.completion" and resp.usage.total_tokens == 18
    sources = resp.model_extra["sources"]
    assert [s["index"] for s in sources] == [1, 2]
    assert sources[0]["document_id"] == "france"
    assert set(sources[0]) == {"index", "document_id", "chunk_id", "text", "score", "metadata"}
    sent = fake_upstream.requests[-1]
    assert "rag" not in sent and sent["model"] == MODEL
    assert sent["messages"][0]["role"] == "system"
    assert "[1] (from france)\nParis is the capital of France." in system_prompt(sent)
    assert "cite" in system_prompt(sent).lower()
    assert sent["messages"][-1] == {"role": "user", "content": "What is the capital of France?"}


def test_stream_through_sdk_with_sources_on_first_chunk(sdk, fake_upstream):
    stream = sdk.chat.completions.create(
        model=MODEL,
        stream=True,
        stream_options={"include_usage": True},
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Which city is Italy's capital?"}],
            }
        ],
    )
    chunks = list(stream)
    assert chunks[0].model_extra["sources"][0]["document_id"] == "italy"
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == fake_upstream.reply.split()
    assert chunks[-1].usage.total_tokens == 18
    assert fake_upstream.requests[-1]["stream_options"] == {"include_usage": True}


def test_unknown_fields_are_forwarded(server, fake_upstream):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi there friend"}],
        "tools": tools,
        "response_format": {"type": "json_object"},
        "vendor_knob": 7,
        "temperature": 0.3,
        "seed": 1,
        "rag": {"enabled": False},
    }
    resp = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    sent = fake_upstream.requests[-1]
    assert sent["tools"] == tools and sent["vendor_knob"] == 7
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["messages"] == body["messages"]  # RAG disabled: prompt untouched
    assert resp.json()["sources"] == []


def test_no_context_found(sdk, fake_upstream):
    resp = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_body={"rag": {"min_score": 0.99}},
    )
    assert resp.model_extra["sources"] == []
    assert "No relevant context was found" in system_prompt(fake_upstream.requests[-1])


def test_follow_up_question_retrieves_with_previous_turn(sdk, fake_upstream):
    resp = sdk.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Tell me about zebras and their coats"},
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": "why is that?"},
        ],
        extra_body={"rag": {"top_k": 1}},
    )
    assert resp.model_extra["sources"][0]["document_id"] == "zebra"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL}, 400, None),
        (
            {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages[0].role",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
            400,
            "messages[0].content",
        ),
        ({"model": MODEL, "messages": "hello"}, 400, "messages"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "max_tokens",
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "max_completion_tokens": 10**6,
            },
            400,
            "max_completion_tokens",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            400,
            "temperature",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
        ({"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "rag": {"collection": "nope"},
            },
            404,
            "rag.collection",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "rag": {"top_k": 0}},
            400,
            "rag.top_k",
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "rag": {"filter": {"bad key": 1}},
            },
            400,
            "rag.filter.bad key",
        ),
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ],
)
def test_bad_requests_send_nothing_upstream(server, fake_upstream, body, status, param):
    resp = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == status, resp.text
    err = error_of(resp)
    if param is not None:
        assert err["param"] == param, err
    assert fake_upstream.requests == []


def test_malformed_json_body(server, fake_upstream):
    resp = httpx.post(
        server + "/v1/chat/completions",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400 and "JSON" in error_of(resp)["message"]
    assert fake_upstream.requests == []


def test_upstream_errors_map_to_clear_statuses(server, fake_upstream):
    msg = {"model": MODEL, "messages": [{"role": "user", "content": "capital of France?"}]}
    fake_upstream.mode = "error500"
    resp = httpx.post(server + "/v1/chat/completions", json=msg, timeout=30)
    assert resp.status_code == 502 and "CUDA out of memory" in error_of(resp)["message"]
    fake_upstream.mode = "error400"
    resp = httpx.post(server + "/v1/chat/completions", json=msg, timeout=30)
    assert resp.status_code == 400
    err = error_of(resp)
    assert "max_tokens is too large" in err["message"] and err["param"] == "max_tokens"
    fake_upstream.mode = "bad_json"
    resp = httpx.post(server + "/v1/chat/completions", json=msg, timeout=30)
    assert resp.status_code == 502 and "invalid JSON" in error_of(resp)["message"]
    fake_upstream.mode, fake_upstream.delay_s = "ok", 3.0  # read timeout is 1 s
    resp = httpx.post(server + "/v1/chat/completions", json=msg, timeout=30)
    assert resp.status_code == 504 and error_of(resp)["type"] == "upstream_timeout"
    resp = httpx.post(server + "/v1/chat/completions", json={**msg, "stream": True}, timeout=30)
    assert resp.status_code == 504


def test_malformed_stream(server, fake_upstream):
    msg = {
        "model": MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": "capital of France?"}],
    }
    fake_upstream.mode = "bad_sse_first"
    resp = httpx.post(server + "/v1/chat/completions", json=msg, timeout=30)
    assert resp.status_code == 502 and "malformed event stream" in error_of(resp)["message"]
    fake_upstream.mode = "bad_sse_mid"
    resp = httpx.post(server + "/v1/chat/completions", json=msg, timeout=30)
    assert resp.status_code == 200
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert '"error"' in events[-2] and "malformed event stream" in events[-2]


def test_upstream_down(tmp_path, embedder):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    settings = Settings(
        data_dir=tmp_path,
        port=free_port(),
        upstream_url=dead,
        upstream_model="m",
        upstream_retries=1,
    )
    with running_server(settings, embedder) as url:
        resp = httpx.post(
            url + "/v1/chat/completions",
            timeout=30,
            json={"model": "m", "messages": [{"role": "user", "content": "hello"}]},
        )
    assert resp.status_code == 502
    assert "cannot connect to the upstream" in error_of(resp)["message"]


def test_client_disconnect_cancels_upstream_stream(server, fake_upstream):
    fake_upstream.chunk_delay_s, fake_upstream.repeat = 0.05, 40  # ~10 s of streaming
    time.sleep(0.3)  # let streams of earlier tests settle their counters
    aborted, finished = fake_upstream.streams_aborted, fake_upstream.streams_finished
    msg = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    started = time.monotonic()
    with httpx.stream("POST", server + "/v1/chat/completions", json=msg, timeout=30) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 5
    while fake_upstream.streams_aborted == aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    # At least ours was cancelled (a stream of an earlier test may end as aborted late, after
    # the counters were read: CI once counted 2), and none ran to its end.
    assert fake_upstream.streams_aborted >= aborted + 1
    assert fake_upstream.streams_finished == finished
    assert time.monotonic() - started < 5  # long before the 10 s stream would have ended


def test_finished_streams_reuse_the_upstream_connection(server, fake_upstream):
    msg = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=server, timeout=30) as client:
        for _ in range(3):
            with client.stream("POST", "/v1/chat/completions", json=msg) as resp:
                assert resp.status_code == 200
                assert list(resp.iter_lines())[-2:] == ["data: [DONE]", ""]
        client.post("/v1/chat/completions", json={**msg, "stream": False}).raise_for_status()
    # One connection carried all four: each stream was read to its end, not dropped.
    assert len(fake_upstream.peers) == 4 and len(set(fake_upstream.peers)) == 1


def test_stream_ends_even_if_the_upstream_keeps_talking_after_done(server, fake_upstream):
    fake_upstream.mode = "talk_after_done"  # would keep the body open for 10 s
    msg = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    started = time.monotonic()
    with httpx.stream("POST", server + "/v1/chat/completions", json=msg, timeout=30) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert not any(line.startswith(":") for line in lines)
    assert time.monotonic() - started < 3
    fake_upstream.mode = "ok"
    ok = httpx.post(server + "/v1/chat/completions", json={**msg, "stream": False}, timeout=30)
    assert ok.status_code == 200  # the cut connection was replaced


def test_models_list(sdk, embedder):
    models = sdk.models.list()
    assert [m.id for m in models.data] == [MODEL, embedder.name]
    embedding = models.data[1].model_extra
    assert embedding["type"] == "embedding" and embedding["dimension"] == embedder.dimension
    # The embeddings endpoint answers to the id it is listed under.
    assert sdk.embeddings.create(model=embedder.name, input="hi").data[0].embedding


def test_retrieval_says_what_was_searched(server, fake_upstream):
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "capital of France?"}]}
    resp = httpx.post(f"{server}/v1/chat/completions", json=ask, timeout=30)
    assert resp.json()["retrieval"] == {"collection": "default", "searched": True}
    assert resp.headers["x-rag-retrieval"] == "searched; collection=default"
    # The default collection gone: still an answer, but it says no collection was searched.
    assert httpx.delete(f"{server}/v1/collections/default", timeout=30).status_code == 204
    for stream in (False, True):
        resp = httpx.post(
            f"{server}/v1/chat/completions", json={**ask, "stream": stream}, timeout=30
        )
        assert resp.status_code == 200
        assert resp.headers["x-rag-retrieval"] == "none; reason=no_collection"
        first = (
            json.loads(resp.text.split("\n\n")[0].removeprefix("data: ")) if stream else resp.json()
        )
        assert first["sources"] == []
        assert first["retrieval"] == {
            "collection": "default",
            "searched": False,
            "reason": "no_collection",
        }
    off = httpx.post(
        f"{server}/v1/chat/completions", json={**ask, "rag": {"enabled": False}}, timeout=30
    )
    assert off.json()["retrieval"]["reason"] == "disabled"
    assert off.headers["x-rag-retrieval"] == "none; reason=disabled"


def test_chat_requires_api_key(make_client, fake_upstream):
    client = make_client(api_key="k")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 401
    assert client.get("/v1/models").status_code == 401
    ok = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"})
    assert ok.status_code == 200


# ---- prompt rules (no server) ----------------------------------------------------------


def test_retrieval_query_rule():
    def user(t):
        return {"role": "user", "content": t}

    assert retrieval_query([user("How do I reset my password on the portal?")]) == (
        "How do I reset my password on the portal?"
    )
    assert retrieval_query(
        [
            user("Tell me about the VPN client setup"),
            {"role": "assistant", "content": "..."},
            user("and on Linux?"),
        ]
    ) == ("Tell me about the VPN client setup\nand on Linux?")
    assert retrieval_query(
        [
            user("What is the refund policy for hardware?"),
            user("Does it also apply to software purchases made online?"),
        ]
    ).startswith("What is the refund policy")
    assert retrieval_query([{"role": "system", "content": "x"}]) is None


def test_fit_prompt_drops_weakest_sources_then_oldest_turns():
    sources = [PromptSource(i, f"d{i}", i, "word " * 50, 1.0 - i / 10, {}) for i in range(1, 5)]
    history = [
        {"role": "user", "content": "old question " * 20},
        {"role": "assistant", "content": "old answer " * 20},
        {"role": "user", "content": "the last question"},
    ]

    def count(messages):
        return sum(len(str(m["content"]).split()) for m in messages)

    full = count(
        fit_prompt(
            history, sources, template="S:\n{sources}", count_tokens=count, budget=10**6, rag=True
        )[0]
    )
    out, used = fit_prompt(
        history, sources, template="S:\n{sources}", count_tokens=count, budget=full - 30, rag=True
    )
    assert [s.document_id for s in used] == ["d1", "d2", "d3"]  # weakest (d4) went first
    assert [s.index for s in used] == [1, 2, 3]
    assert len(out) == 4
    out, used = fit_prompt(
        history, sources, template="S:\n{sources}", count_tokens=count, budget=30, rag=True
    )
    assert used == [] and out[-1]["content"] == "the last question"
    assert all("old" not in str(m["content"]) for m in out)
    with pytest.raises(Exception, match="window"):
        fit_prompt(
            history, sources, template="S:\n{sources}", count_tokens=count, budget=3, rag=True
        )


def test_fit_prompt_skips_counting_when_the_upper_bound_fits():
    sources = [PromptSource(i, f"d{i}", i, "word " * 50, 1.0 - i / 10, {}) for i in range(1, 5)]
    history = [{"role": "user", "content": "the last question"}]
    counted: list[int] = []

    def count(messages):
        counted.append(1)
        return sum(len(str(m["content"]).split()) for m in messages)

    def bound(messages):
        return sum(len(str(m["content"])) for m in messages)

    full = bound(
        fit_prompt(
            history, sources, template="{sources}", count_tokens=count, budget=10**6, rag=True
        )[0]
    )
    counted.clear()
    _, used = fit_prompt(
        history,
        sources,
        template="{sources}",
        count_tokens=count,
        budget=full,
        rag=True,
        upper_bound=bound,
    )
    assert len(used) == 4 and counted == []
    # The bound is over budget but the exact count is not: nothing is dropped.
    _, used = fit_prompt(
        history,
        sources,
        template="{sources}",
        count_tokens=count,
        budget=full - 1,
        rag=True,
        upper_bound=bound,
    )
    assert len(used) == 4 and counted == [1]


def test_upstream_upper_bound_is_never_below_its_estimate(embedder):
    from rag_service.backends.upstream import UpstreamBackend

    backend = UpstreamBackend(
        Settings(upstream_url="http://127.0.0.1:9/v1"),
        count_text_tokens=lambda t: len(embedder.tokenizer.encode(t, add_special_tokens=False).ids),
    )
    texts = [
        "plain English words",
        "ünïcödé äöü ß",
        "数据库连接池配置",
        "emoji 🙂🙃 mix",
        "x" * 5000,
        "a\nb\tc  d",
        "",
    ]
    for text in texts:
        messages = [{"role": "user", "content": text}, {"role": "system", "content": text[::-1]}]
        assert backend.token_upper_bound(messages) >= backend.count_tokens(messages)


def test_event_stream_writes_the_first_event_before_listening_for_disconnect():
    import asyncio

    from rag_service.streaming import EventStream

    log: list[str] = []

    async def events():
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    async def run() -> None:
        ended = asyncio.Event()

        async def receive():
            log.append("receive")
            await ended.wait()  # as servers do: the connection is done once the body is
            return {"type": "http.disconnect"}

        async def send(message):
            log.append(message["type"] + ":" + message.get("body", b"-").decode())
            if message["type"] == "http.response.body" and not message["more_body"]:
                ended.set()

        response = EventStream(events(), headers={"Cache-Control": "no-cache"})
        asgi = response.to_asgi_response(None, None)
        await asyncio.wait_for(asgi({"type": "http"}, receive, send), 10)  # type: ignore[arg-type]

    asyncio.run(run())
    assert log[:2] == ["http.response.start:-", "http.response.body:data: 1\n\n"]
    assert log.index("receive") > 1
    assert log[-2:] == ["http.response.body:data: 2\n\n", "http.response.body:"]
