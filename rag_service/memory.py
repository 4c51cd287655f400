"""Giving freed memory back to the operating system, after large requests.

glibc's allocator keeps what a request freed in its arenas (one per thread that allocated),
so a process that once held gigabytes for one large request keeps them: a 1,023-message chat
on the local model left the service at 2.5 GB where it had been at 0.9. ``malloc_trim(0)``
returns the free pages of every arena. :func:`trim` calls it where it exists (glibc), and is
a no-op elsewhere (musl, macOS), where the allocator behaves differently anyway.

:class:`Trimmer` decides when: after a request that was large (a body of at least
:data:`LARGE_BODY_BYTES`) or long (at least :data:`LONG_REQUEST_S`), at most once per
``min_interval_s``, and after every local generation batch over a prompt of at least
:data:`LONG_PROMPT_TOKENS` (the generation thread frees its key-value cache only when the batch
ends, after the answer went out), on a worker thread. Measured
(benchmarks/bench_hardening.py, 2-core CPU): a 1,023-message chat on the local model left the
server 723 MB above where it started with ``RAG_TRIM_MEMORY=false``, 11 MB with the trims;
one trim of a 2.7 GB heap took 0.24 s, on its thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import threading
import time
from typing import Any

__all__ = ["LARGE_BODY_BYTES", "LONG_PROMPT_TOKENS", "LONG_REQUEST_S", "Trimmer", "trim"]

LARGE_BODY_BYTES = 1024 * 1024
LONG_REQUEST_S = 1.0
LONG_PROMPT_TOKENS = 2048

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def trim() -> bool:
    """Return freed heap memory to the OS; whether the allocator could do it here."""
    function = _malloc_trim()
    if function is None:
        return False
    function(0)
    return True


class Trimmer:
    """Trims on its own thread after a large or long request (:meth:`after`, at most once per
    ``min_interval_s``) and after a local generation over a long prompt
    (:meth:`after_generation`, always: its key-value cache, hundreds of MB for an 8k-token
    prompt, is freed only when the whole batch ends, after its answers were sent)."""

    def __init__(self, min_interval_s: float = 2.0) -> None:
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._running = False
        self._again = False
        self._lock = threading.Lock()
        self.trims = 0

    def after(self, seconds: float, body_bytes: int) -> bool:
        """Start a trim when the request took ``seconds`` or carried ``body_bytes`` past the
        thresholds, unless one runs or ran within ``min_interval_s``; whether it started."""
        if seconds < LONG_REQUEST_S and body_bytes < LARGE_BODY_BYTES:
            return False
        return self._start(force=False)

    def after_generation(self, prompt_tokens: int) -> bool:
        """Trim after a generation batch whose longest prompt had ``prompt_tokens``."""
        if prompt_tokens < LONG_PROMPT_TOKENS:
            return False
        return self._start(force=True)

    def _start(self, *, force: bool) -> bool:
        with self._lock:
            if self._running:
                self._again = self._again or force  # once more when this one ends
                return False
            if not force and time.monotonic() - self._last < self.min_interval_s:
                return False
            self._running = True
        threading.Thread(target=self._trim, name="malloc-trim", daemon=True).start()
        return True

    def _trim(self) -> None:
        while True:
            try:
                # Garbage in reference cycles (a generation's outputs, an exception's frames)
                # is only freed by the collector; what start-up loaded is frozen, so this walks
                # the objects made since (milliseconds), then the freed pages go back.
                gc.collect()
                trim()
                self.trims += 1
            finally:
                with self._lock:
                    again, self._again = self._again, False
                    if not again:
                        self._running = False
                        self._last = time.monotonic()
            if not again:
                return
