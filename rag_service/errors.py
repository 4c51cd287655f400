"""The service's error tree, and its one mapping to HTTP and the OpenAI error body.

::

    RagError                      500 server_error
    ├── InvalidRequest            400 invalid_request_error   (param names the field)
    │   ├── IndexConfigError      400 bad index option for a collection
    │   ├── PayloadTooLarge       413 a request past a size limit (the limit is named)
    │   └── UnsupportedMediaType  415 a JSON route's body sent as another Content-Type
    ├── Unauthorized              401 authentication_error
    ├── Forbidden                 403 permission_error        (a valid key without the scope)
    ├── NotFound                  404 not_found_error
    │   ├── CollectionNotFound
    │   ├── DocumentNotFound
    │   └── ModelNotFound
    ├── Conflict                  409 conflict_error
    │   ├── CollectionExists
    │   ├── EmbeddingMismatch     collection or index made by another embedding model
    │   └── ReindexInProgress     the collection is being moved to another model already
    ├── ClientDisconnected        499 the client left before its answer (nobody reads it)
    ├── Overloaded                503 overloaded_error        (Retry-After header)
    ├── NotReady                  503 service_unavailable
    ├── StoreDown                 503 the database is unreachable (Retry-After)
    └── UpstreamError             502 upstream_error          (the generation server failed)
        ├── UpstreamRejected      the upstream's own 4xx, passed on with its status and message
        ├── UpstreamIncomplete    its stream ended with no [DONE] and no finish_reason
        └── UpstreamTimeout       504 upstream_timeout

The storage layer's own errors (``indexes.engine``) are translated by :func:`from_storage`.
Third-party errors are wrapped where they enter (``raise X(...) from exc``); route handlers
never catch bare ``Exception``. :func:`exception_handlers` is the only place a status is chosen.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from indexes.engine import (
    CollectionGone,
    CollectionTaken,
    IndexUnusable,
    InvalidIndex,
    StaleWrite,
    StorageError,
    StoreBusy,
    StoreUnavailable,
)
from indexes.reindex import ModelChanged, ReindexRunning

__all__ = [
    "ClientDisconnected",
    "CollectionExists",
    "CollectionNotFound",
    "Conflict",
    "DocumentNotFound",
    "EmbeddingMismatch",
    "EmptyFile",
    "FileTooLarge",
    "Forbidden",
    "IndexConfigError",
    "InvalidRequest",
    "ModelNotFound",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RagError",
    "ReindexInProgress",
    "StoreDown",
    "Unauthorized",
    "UnreadableFile",
    "UnsupportedFileType",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamIncomplete",
    "UpstreamRejected",
    "UpstreamTimeout",
    "error_body",
    "exception_handlers",
    "from_storage",
]

log = logging.getLogger(__name__)


class RagError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(RagError):
    status_code = 400
    error_type = "invalid_request_error"


class IndexConfigError(InvalidRequest):
    code = "invalid_index"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    """A JSON route sent a body that does not say it is JSON (Content-Type)."""

    status_code = 415
    code = "unsupported_media_type"


class UnsupportedFileType(InvalidRequest):
    status_code = 415
    code = "unsupported_file_type"


class FileTooLarge(PayloadTooLarge):
    code = "file_too_large"


class EmptyFile(InvalidRequest):
    code = "empty_file"


class UnreadableFile(InvalidRequest):
    """A file that does not parse: corrupt, encrypted, or a PDF without a text layer."""

    status_code = 422
    code = "unreadable_file"


class Unauthorized(RagError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(RagError):
    status_code = 403
    error_type = "permission_error"
    code = "insufficient_permissions"


class NotFound(RagError):
    status_code = 404
    error_type = "not_found_error"


class CollectionNotFound(NotFound):
    code = "collection_not_found"


class DocumentNotFound(NotFound):
    code = "document_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(RagError):
    status_code = 409
    error_type = "conflict_error"


class CollectionExists(Conflict):
    code = "collection_exists"


class EmbeddingMismatch(Conflict):
    code = "embedding_mismatch"


class ReindexInProgress(Conflict):
    code = "reindex_in_progress"


class ClientDisconnected(RagError):
    """The client closed the connection while its request was worked on; the work was
    cancelled. Logged as 499 (nginx's "client closed request"); no client reads it."""

    status_code = 499
    error_type = "client_closed_request"


class Overloaded(RagError):
    status_code = 503
    error_type = "overloaded_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class NotReady(RagError):
    status_code = 503
    error_type = "service_unavailable"
    code = "not_ready"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class StoreDown(RagError):
    """The storage engine's database cannot be reached; the replica recovers by itself."""

    status_code = 503
    error_type = "service_unavailable"
    code = "store_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


class UpstreamError(RagError):
    status_code = 502
    error_type = "upstream_error"
    code = "bad_gateway"


class UpstreamRejected(UpstreamError):
    """The upstream answered 4xx: its status and message are passed on to the client."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        param: str | None = None,
        error_type: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.status_code = status_code  # type: ignore[misc]
        self.error_type = error_type or "invalid_request_error"  # type: ignore[misc]
        self.code = code  # type: ignore[misc,assignment]


class UpstreamIncomplete(UpstreamError):
    """The upstream's stream ended before its answer did (cut short, not finished)."""

    code = "incomplete_stream"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    error_type = "upstream_timeout"
    code = "timeout"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _http_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


def _rag_error(_: Request[Any, Any, Any], exc: RagError) -> Response[Any]:
    if exc.status_code >= 500 and not isinstance(exc, Overloaded | NotReady):
        log.error("request failed: %s", exc.message, exc_info=exc)
    return Response(
        error_body(exc.message, exc.error_type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=exc.headers(),
    )


def _validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Litestar/msgspec decode errors: name the offending field in ``param``."""
    param: str | None = None
    message = exc.detail
    if isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            param = first.get("key") or None
            detail = first.get("message", "")
            message = f"{detail} at '{param}'" if param else detail or message
    if exc.detail.startswith("JSON is malformed"):
        message = f"Request body is not valid JSON: {exc.detail}"
    return Response(
        error_body(message, "invalid_request_error", param, "invalid_value"),
        status_code=400,
    )


def _http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if status >= 500:
        log.error("unhandled HTTP error %s: %s", status, exc.detail)
    return Response(
        error_body(exc.detail or "error", _http_type(status)),
        status_code=status,
        headers=exc.headers or {},
    )


def _unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unexpected error", exc_info=exc)
    return Response(
        error_body("Internal server error; see the service log.", "server_error"),
        status_code=500,
    )


def from_storage(exc: StorageError) -> RagError:
    """The storage layer's errors (:mod:`indexes.engine`) in this tree: the one table."""
    message = str(exc)
    if isinstance(exc, CollectionGone):
        return CollectionNotFound(message, param="collection")
    if isinstance(exc, CollectionTaken):
        return CollectionExists(message, param="name")
    if isinstance(exc, InvalidIndex):
        return IndexConfigError(message, param="index")
    if isinstance(exc, IndexUnusable):
        return EmbeddingMismatch(message, param="collection")
    if isinstance(exc, ReindexRunning):
        return ReindexInProgress(message, param="name")
    if isinstance(exc, ModelChanged):  # a StaleWrite, but not a write race: check it first
        return Overloaded(
            f"{message}: a reindex moved the collection to another embedding model while "
            "this request was being embedded; retry",
            retry_after_s=1,
        )
    if isinstance(exc, StaleWrite):
        return Overloaded(f"{message} (other writes of these ids kept winning)", retry_after_s=1)
    if isinstance(exc, StoreBusy):
        return Overloaded(f"{message}; retry shortly", retry_after_s=1)
    if isinstance(exc, StoreUnavailable):
        return StoreDown(message)
    return RagError(message)


def _storage_error(request: Request[Any, Any, Any], exc: StorageError) -> Response[Any]:
    return _rag_error(request, from_storage(exc))


def exception_handlers() -> dict[type[Exception] | int, Any]:
    return {
        RagError: _rag_error,
        StorageError: _storage_error,
        ValidationException: _validation_error,
        HTTPException: _http_exception,
        Exception: _unexpected,
    }
