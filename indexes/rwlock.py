"""A writer-preferring readers-writer lock for threads.

Searches hold the read side while they query an index and read the rows it points at;
writers hold the write side only to commit and apply their change to the index (a swap), so a
search sees a collection either before or after an upsert, never half of it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RWLock"]


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def read_nowait(self) -> Iterator[bool]:
        """The read side if it is free right now (yields True), else nothing (yields False).

        For callers that must not block, such as the event loop: on False they go the slow way.
        """
        with self._cond:
            acquired = not (self._writer or self._writers_waiting)
            if acquired:
                self._readers += 1
        try:
            yield acquired
        finally:
            if acquired:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
