"""File loaders in worker processes: killable, memory-capped and time-budgeted.

Parsing a file is the one piece of work whose cost the client shapes (a Word document of
1.9 million empty paragraphs, Markdown made to drive an emphasis parser quadratic, HTML
nested a million deep). In a thread such a file could not be stopped: it kept a core busy
after its client left, and SIGTERM could not end the server. So the loaders of
:mod:`rag_service.loaders` run here, in a small pool of worker processes (``pebble``'s
``ProcessPool``), for the upload endpoint and ``rag-service ingest`` alike:

* each worker's address space is capped (``RLIMIT_AS``, RAG_LOADER_MEMORY_MB): a file that
  needs more fails there, and is refused 413, instead of growing the service;
* each file has a time budget (RAG_LOADER_TIMEOUT_S): past it its worker is killed (and
  replaced) and the file refused 413;
* a caller that stops waiting (its client disconnected, the server is shutting down)
  cancels the file: its worker is killed at once;
* a worker parses one file at a time, so PDFium (not thread-safe) never sees two.

Workers are forked from a fork server that imported the parsers once (the service's own
process, with its models and threads, is never forked), so a replacement is ready in
milliseconds and a file costs the service a pipe round trip
(``benchmarks/results/hardening.json``, ``loader_overhead``). After each file a worker
returns its freed memory to the system (:func:`rag_service.memory.trim`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import resource
import threading
from typing import Any

from rag_service.loaders import LoadError, LoadLimits, SourceDocument, load_bytes
from rag_service.memory import trim

__all__ = ["LoaderPool"]

log = logging.getLogger(__name__)

# Imported once by the fork server, so every worker starts with them loaded (the main module
# too: multiprocessing would otherwise import it again in each worker).
_PRELOAD = [
    "__main__",
    "rag_service.loader_workers",
    "bs4",
    "docx",
    "markdown_it",
    "pypdfium2",
    "lxml.etree",
]


def _start_worker(memory_bytes: int) -> None:
    """Runs in each new worker: cap its address space."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def _load_in_worker(
    data: bytes, filename: str, doc_id: str, limits: LoadLimits
) -> list[SourceDocument]:
    try:
        return load_bytes(data, filename, doc_id, limits)
    finally:
        del data
        trim()


class LoaderPool:
    """:meth:`load` (async) and :meth:`load_sync` parse a file in a worker process and give
    its documents, or raise :class:`~rag_service.loaders.LoadError` (a time, memory or
    document bound passed is kind ``limit``, naming its setting). The workers start on
    first use; :meth:`close` kills them."""

    def __init__(
        self,
        *,
        workers: int = 2,
        timeout_s: float = 60.0,
        memory_mb: int = 2048,
        limits: LoadLimits | None = None,
    ) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.limits = limits or LoadLimits()
        self._pool: Any = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Any) -> LoaderPool:
        """A pool with the RAG_LOADER_* and document bound settings of ``settings``."""
        return cls(
            workers=settings.loader_workers,
            timeout_s=settings.loader_timeout_s,
            memory_mb=settings.loader_memory_mb,
            limits=LoadLimits(
                unzipped_bytes=settings.max_unzipped_bytes,
                zip_entries=settings.max_zip_entries,
                elements=settings.max_document_elements,
                html_depth=settings.max_html_depth,
            ),
        )

    def _started(self) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError("the loader pool is closed")
            if self._pool is None:
                from pebble import ProcessPool

                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(_PRELOAD)
                self._pool = ProcessPool(
                    max_workers=self.workers,
                    initializer=_start_worker,
                    initargs=(self.memory_mb * 1024 * 1024,),
                    context=context,
                )
            return self._pool

    def start(self) -> None:
        """Start the workers now (one trivial file through each), so the first upload does
        not pay for starting them."""
        for future in [self.submit(b"warm", "warm.txt", "warm") for _ in range(self.workers)]:
            future.result()

    def submit(self, data: bytes, filename: str, doc_id: str) -> concurrent.futures.Future[Any]:
        """The worker's future for one file (cancel it to kill its worker)."""
        future: concurrent.futures.Future[Any] = self._started().schedule(
            _load_in_worker, args=(data, filename, doc_id, self.limits), timeout=self.timeout_s
        )
        return future

    async def load(self, data: bytes, filename: str, doc_id: str) -> list[SourceDocument]:
        """The documents of one file. Cancelling the awaiting task kills the file's worker."""
        future = self.submit(data, filename, doc_id)
        try:
            return await asyncio.wrap_future(future)  # cancelled here: cancelled there
        except (LoadError, asyncio.CancelledError):
            raise
        except BaseException as exc:
            raise self._error(exc, filename) from exc

    def load_sync(self, data: bytes, filename: str, doc_id: str) -> list[SourceDocument]:
        """:meth:`load` for a caller without an event loop (``rag-service ingest``)."""
        future = self.submit(data, filename, doc_id)
        try:
            result: list[SourceDocument] = future.result()
            return result
        except LoadError:
            raise
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                future.cancel()
                raise
            raise self._error(exc, filename) from exc

    def _error(self, exc: BaseException, filename: str) -> LoadError:
        from pebble import ProcessExpired

        if isinstance(exc, concurrent.futures.TimeoutError):
            return LoadError(
                filename,
                f"took longer than {self.timeout_s:g} s to parse (RAG_LOADER_TIMEOUT_S)",
                kind="limit",
            )
        if isinstance(exc, MemoryError):
            return LoadError(
                filename,
                f"needs more than {self.memory_mb} MiB to parse (RAG_LOADER_MEMORY_MB)",
                kind="limit",
            )
        if isinstance(exc, ProcessExpired):
            return LoadError(
                filename,
                f"its parser stopped (exit code {exc.exitcode}); it may need more than "
                f"{self.memory_mb} MiB (RAG_LOADER_MEMORY_MB)",
                kind="limit",
            )
        log.error("loading %s failed in its worker", filename, exc_info=exc)
        return LoadError(filename, f"could not be parsed ({type(exc).__name__})")

    def close(self) -> None:
        """Kill the workers (a file being parsed is abandoned)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            pool.join(timeout=10)
