"""Work that stops when its client leaves.

An ASGI app learns that its client closed the connection from ``receive()``: once the
request body has been read, the next message is ``http.disconnect``, sent when the
connection is lost (or after the response is complete). :func:`cancel_on_disconnect` awaits
a piece of work and that message together; when the client leaves first the work is
cancelled (a file being parsed in a loader process kills that process) and
:class:`~rag_service.errors.ClientDisconnected` is raised.

Only work that is safe to abandon goes through it: parsing an upload's files, not the
upsert that stores them (which is one transaction, and is left to finish).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from litestar.types import Receive

from rag_service.errors import ClientDisconnected

__all__ = ["cancel_on_disconnect"]

T = TypeVar("T")


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """The result of ``work``; it is cancelled, and :class:`ClientDisconnected` raised, if
    the client disconnects first. Call it after the request body has been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # cancelled from outside (shutdown): both go
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
    if task.done() and not task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # its cancellation has run (a loader process is killed) before we answer
    raise ClientDisconnected("the client disconnected; its request was cancelled")
