"""Process logging for ``rag-service serve``: records are formatted and written by a thread.

The event loop only creates a record and puts it on a queue. Formatting and the write itself
(a terminal, a pipe, a container log driver that may be slow to read) happen on the listener
thread, so logging, including uvicorn's access line for every request, never blocks the loop.
"""

from __future__ import annotations

import logging
import queue
from logging.handlers import QueueHandler, QueueListener

__all__ = ["FORMAT", "start_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _RecordQueueHandler(QueueHandler):
    """Queues the record as it is: the listener thread formats it (the stock handler formats
    on the caller's thread, so that records can cross process boundaries; ours never do)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def start_logging(level: str) -> QueueListener:
    """Route the root logger (and everything that propagates to it) through a queue to
    stderr; call ``.stop()`` on the result to flush at exit."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = QueueListener(records, handler)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(_RecordQueueHandler(records))
    root.setLevel(level.upper())
    # httpx logs every upstream request at INFO; the access log already has one line each.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    listener.start()
    return listener
