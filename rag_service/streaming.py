"""The SSE response of chat streams: its first event leaves with no framework work in between.

Litestar's streaming response starts a task group (the body is sent from a new task while
the current one listens for the client going away) before the first body bytes are written.
Our first event is ready before the response starts (the first upstream chunk is fetched so
that an upstream that fails at once still gets a proper HTTP status), so it is written right
after the headers, and only then does the stream go on the usual way, with the listener.
That is the client's time to first token, a few tenths of a millisecond earlier.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse

if TYPE_CHECKING:
    from litestar.types import Receive, Send

__all__ = ["EventStream"]


class _FirstEventFirst(ASGIStreamingResponse):
    async def send_body(self, send: Send, receive: Receive) -> None:
        events = aiter(self.iterator)
        first = await anext(events, None)
        if first is not None:
            body = first if isinstance(first, bytes) else first.encode(self.encoding)
            await send({"type": "http.response.body", "body": body, "more_body": True})
        self.iterator = events
        await super().send_body(send, receive)


class EventStream(Stream):
    """``text/event-stream`` over an async iterator of encoded events."""

    def __init__(self, events: AsyncIterator[bytes], *, headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)

    def to_asgi_response(  # type: ignore[override]
        self,
        app: Any,
        request: Any,
        *,
        background: Any = None,
        cookies: Any = None,
        encoded_headers: Any = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: Any = None,
        status_code: int | None = None,
        type_encoders: Any = None,
    ) -> ASGIResponse:
        return _FirstEventFirst(
            iterator=self.iterator,  # type: ignore[arg-type]
            background=self.background or background,
            content_length=0,
            cookies=self.cookies if cookies is None else itertools.chain(self.cookies, cookies),
            encoded_headers=encoded_headers,
            encoding=self.encoding,
            headers={**headers, **self.headers} if headers is not None else self.headers,
            is_head_response=is_head_response,
            media_type="text/event-stream",
            status_code=self.status_code or status_code,
        )
