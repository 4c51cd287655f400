"""Giving freed memory back to the operating system.

glibc's allocator keeps what a request freed in its arenas (one per thread that allocated),
so a process that once held gigabytes for one large request keeps them: a 1,023-message chat
on the local model left the service at 2.5 GB where it had been at 0.9. ``malloc_trim(0)``
returns the free pages of every arena. :func:`trim` calls it where it exists (glibc), and is
a no-op elsewhere (musl, macOS), where the allocator behaves differently anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any

__all__ = ["trim"]

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
