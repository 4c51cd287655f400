"""An upstream that cuts its answer short or sends events of the wrong shape: the client is
told (an HTTP error before the stream starts, an error event after), never handed a partial
answer that looks complete. A real server on loopback, read with httpx and the openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from rag_service.settings import Settings
from tests.fake_upstream import MODEL, FakeUpstream
from tests.support import error_of, free_port, running_server

MSG = {"model": MODEL, "messages": [{"role": "user", "content": "capital of France?"}]}
STREAM = {**MSG, "stream": True}

# Valid JSON that is no chat.completion(.chunk): each must be refused, not relayed or crashed on.
NOT_A_CHUNK = [
    b"[1,2,3]",
    b'"x"',
    b"5",
    b"null",
    b'{"id": "c", "object": "chat.completion.chunk", "choices": {"index": 0}}',
    b'{"id": "c", "object": "chat.completion.chunk", "choices": [1]}',
]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, embedder: Any, fake_server: FakeUpstream
) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        port=free_port(),
        upstream_url=fake_server.url,
        upstream_read_timeout_s=5.0,
    )
    with running_server(settings, embedder) as url:
        yield url


@pytest.fixture
def sdk(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def events(resp: httpx.Response) -> list[Any]:
    """The data of each SSE event, JSON-decoded except ``[DONE]``."""
    out: list[Any] = []
    for line in resp.text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def text_of(chunks: list[Any]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if isinstance(c, dict) and c.get("choices")
    )


def assert_still_serving(server: str, fake: FakeUpstream) -> None:
    fake.mode = "ok"
    resp = httpx.post(server + "/v1/chat/completions", json=STREAM, timeout=30)
    assert resp.status_code == 200 and events(resp)[-1] == "[DONE]"
    assert text_of(events(resp)).split() == fake.reply.split()


# ---- (a) a stream cut short -----------------------------------------------------------------
def test_truncated_stream_ends_with_an_error_event(server, fake_upstream):
    fake_upstream.mode = "truncated_sse"  # two words, then the body ends: no finish, no [DONE]
    resp = httpx.post(server + "/v1/chat/completions", json=STREAM, timeout=30)
    assert resp.status_code == 200  # the first chunk was sent before the cut was known
    got = events(resp)
    assert got[-1] == "[DONE]"
    error = got[-2]
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "upstream_error"
    assert error["error"]["code"] == "incomplete_stream"
    assert "ended early" in error["error"]["message"]
    # The partial answer came first, and nothing before the error claims to have finished.
    assert text_of(got[:-2]).split() == fake_upstream.reply.split()[:2]
    assert all(c["choices"][0]["finish_reason"] is None for c in got[:-2])


def test_truncated_stream_raises_in_the_openai_sdk(sdk, fake_upstream):
    fake_upstream.mode = "truncated_sse"
    stream = sdk.chat.completions.create(**STREAM)
    received: list[Any] = []
    with pytest.raises(openai.APIError, match="ended early") as caught:
        for chunk in stream:
            received.append(chunk)
    assert caught.value.type == "upstream_error" and caught.value.code == "incomplete_stream"
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert text.split() == fake_upstream.reply.split()[:2]


def test_empty_stream_is_a_502(server, fake_upstream):
    fake_upstream.mode = "empty_sse"  # 200, then a body with no event at all
    resp = httpx.post(server + "/v1/chat/completions", json=STREAM, timeout=30)
    assert resp.status_code == 502
    err = error_of(resp)
    assert err["type"] == "upstream_error" and "ended early" in err["message"]
    assert_still_serving(server, fake_upstream)


def test_stream_with_finish_reason_but_no_done_is_complete(sdk, fake_upstream):
    fake_upstream.mode = "no_done"  # finish_reason and usage chunks, then the body ends
    stream = sdk.chat.completions.create(**STREAM, stream_options={"include_usage": True})
    chunks = list(stream)  # no APIError
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == fake_upstream.reply.split()
    assert chunks[-1].usage.total_tokens == 18


def test_stream_with_finish_reason_but_no_done_ends_with_done(server, fake_upstream):
    fake_upstream.mode = "no_done"
    resp = httpx.post(server + "/v1/chat/completions", json=STREAM, timeout=30)
    got = events(resp)
    assert resp.status_code == 200 and got[-1] == "[DONE]"
    assert not any("error" in c for c in got[:-1])
    assert got[-2]["choices"][0]["finish_reason"] == "stop"


def test_truncated_json_answer_is_a_502(server, fake_upstream):
    fake_upstream.mode = "truncated_json"  # a well-framed 200 holding half an object
    resp = httpx.post(server + "/v1/chat/completions", json=MSG, timeout=30)
    assert resp.status_code == 502
    err = error_of(resp)
    assert err["type"] == "upstream_error" and "invalid JSON" in err["message"]


# ---- (b) events that are no chat.completion.chunk --------------------------------------------
@pytest.mark.parametrize("data", NOT_A_CHUNK, ids=lambda d: d.decode()[:40])
def test_odd_first_event_is_a_502(server, fake_upstream, data):
    fake_upstream.mode, fake_upstream.bad_data = "bad_sse_first", data
    resp = httpx.post(server + "/v1/chat/completions", json=STREAM, timeout=30)
    assert resp.status_code == 502
    err = error_of(resp)
    assert err["type"] == "upstream_error" and "malformed event stream" in err["message"]
    assert_still_serving(server, fake_upstream)


@pytest.mark.parametrize("data", NOT_A_CHUNK, ids=lambda d: d.decode()[:40])
def test_odd_event_mid_stream_ends_with_an_error_event(server, fake_upstream, data):
    fake_upstream.mode, fake_upstream.bad_data = "bad_sse_mid", data
    resp = httpx.post(server + "/v1/chat/completions", json=STREAM, timeout=30)
    assert resp.status_code == 200
    got = events(resp)
    assert got[-1] == "[DONE]"
    assert got[-2]["error"]["type"] == "upstream_error"
    assert "malformed event stream" in got[-2]["error"]["message"]
    # Only real chunks were relayed: the odd event itself never reached the client.
    assert all(isinstance(c, dict) and isinstance(c.get("choices"), list) for c in got[:-2])
    assert_still_serving(server, fake_upstream)


@pytest.mark.parametrize("data", [b"[1,2,3]", b'"x"', b'{"id": "c", "choices": {"0": 1}}'])
def test_odd_json_answer_is_a_502(server, fake_upstream, data):
    fake_upstream.mode, fake_upstream.bad_data = "odd_json", data
    resp = httpx.post(server + "/v1/chat/completions", json=MSG, timeout=30)
    assert resp.status_code == 502
    err = error_of(resp)
    assert err["type"] == "upstream_error" and "not a chat.completion" in err["message"]


# ---- (c) transport failures: one map from httpx's errors to the service's ------------------
def _httpx_errors(kind: type[httpx.HTTPError] = httpx.HTTPError) -> list[type[httpx.HTTPError]]:
    out = [kind]
    for sub in kind.__subclasses__():
        out += _httpx_errors(sub)
    return out


@pytest.mark.parametrize("kind", _httpx_errors(), ids=lambda k: k.__name__)
def test_every_httpx_error_becomes_an_upstream_error(kind):
    """Whatever httpx raises inside ``map_transport_errors`` leaves as an UpstreamError (from
    it): a timeout is 504, no connection 502 naming the server, anything else 502."""
    from rag_service.backends.upstream import map_transport_errors
    from rag_service.errors import UpstreamError, UpstreamTimeout

    request = httpx.Request("POST", "http://upstream.invalid/v1/chat/completions")
    raised = (
        kind("boom", request=request, response=httpx.Response(500, request=request))
        if kind is httpx.HTTPStatusError
        else kind("boom")
    )
    with (
        pytest.raises(UpstreamError) as caught,
        map_transport_errors("doing a thing", "http://upstream.invalid/v1"),
    ):
        raise raised
    error = caught.value
    assert error.__cause__ is raised and "(doing a thing)" in error.message
    if issubclass(kind, httpx.ConnectError | httpx.ConnectTimeout):
        assert type(error) is UpstreamError and error.status_code == 502
        assert (
            "cannot connect to the upstream server at http://upstream.invalid/v1" in error.message
        )
    elif issubclass(kind, httpx.TimeoutException):
        assert type(error) is UpstreamTimeout and error.status_code == 504
    else:
        assert type(error) is UpstreamError and error.status_code == 502


def test_other_errors_pass_through_the_map():
    from rag_service.backends.upstream import map_transport_errors

    with (
        pytest.raises(ValueError, match="not a transport error"),
        map_transport_errors("doing a thing", "http://upstream.invalid/v1"),
    ):
        raise ValueError("not a transport error")


@pytest.fixture(scope="module")
def impatient(
    tmp_path_factory: pytest.TempPathFactory, embedder: Any, fake_server: FakeUpstream
) -> Iterator[str]:
    """A service that waits 0.5 s for the upstream's next bytes."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("impatient"),
        port=free_port(),
        upstream_url=fake_server.url,
        upstream_read_timeout_s=0.5,
    )
    with running_server(settings, embedder) as url:
        yield url


def test_stream_that_goes_silent_ends_with_a_timeout_event(impatient, fake_upstream):
    fake_upstream.chunk_delay_s = 1.5  # the first event, then silence past the read timeout
    resp = httpx.post(impatient + "/v1/chat/completions", json=STREAM, timeout=30)
    assert resp.status_code == 200  # the first event was sent before the silence
    got = events(resp)
    assert got[-1] == "[DONE]"
    error = got[-2]["error"]
    assert error["type"] == "upstream_timeout" and error["code"] == "timeout"
    assert "did not answer in time (reading the answer stream)" in error["message"]
    assert text_of(got[:-2]) == ""  # nothing of the answer was made up
    fake_upstream.chunk_delay_s = 0.0
    assert_still_serving(impatient, fake_upstream)
