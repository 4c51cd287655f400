"""Liveness, readiness and Prometheus metrics.

``/ready`` answers everyone whether the service is ready (200) or not (503); what it is made
of (models, runtimes, the storage engine and its restore report with collection names, the
database) only to the admin key, or to anyone on a service without RAG_API_KEY."""

from __future__ import annotations

import os
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State

from rag_service.dependencies import require_metrics_key, resolve_principal
from rag_service.errors import RagError, error_body
from rag_service.openapi import error_responses

__all__ = ["health", "metrics", "ready"]


@get("/health", sync_to_thread=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


def _shows_details(request: Request[Any, Any, Any]) -> bool:
    """Whether ``/ready`` may say more than ready or not: to the admin key, or on a service
    without RAG_API_KEY (where everything it would name is open anyway). Collection names,
    the database's host and name, paths in startup errors are nobody else's business."""
    try:
        return resolve_principal(request).unrestricted
    except RagError:  # no key, a wrong one, or keys not loaded yet
        return False


@get("/ready", sync_to_thread=False, responses=error_responses(503, v1=False))
def ready(state: State, request: Request[Any, Any, Any]) -> Response[Any]:
    details = _shows_details(request)
    kb = state.get("kb")
    if kb is None:
        error = state.get("startup_error")
        waiting = state.get("waiting_for")
        message = f"startup failed: {error}" if error else (waiting or "loading models and indexes")
        if not details:
            message = (
                "startup failed; see the service log"
                if error
                else ("waiting for the database" if waiting else "loading models and indexes")
            )
        return Response(
            error_body(message, "service_unavailable", None, "not_ready"),
            status_code=503,
            headers={"Retry-After": "1"},
        )
    store = kb.engine.describe()
    if store.get("connected") is False:  # a database engine that lost its database
        return Response(
            error_body(
                "the database is unreachable; retrying",
                "service_unavailable",
                None,
                "store_unavailable",
            ),
            status_code=503,
            headers={"Retry-After": "2"},
        )
    if not details:
        return Response({"status": "ready"})
    return Response(
        {
            "status": "ready",
            "pid": os.getpid(),  # which process answered (several with serve --workers N)
            "embedding_model": kb.embedder.name,
            "embedding_models": [m.id for m in kb.models.loaded()],  # the default's first
            "device": kb.embedder.device,
            # What runs each encoder, and why (e.g. why PyTorch when ONNX could not be used).
            "runtimes": {
                **{m.id: _runtime(m.embedder) for m in kb.models.loaded()},
                **({"reranker": _runtime(kb.reranker)} if kb.reranker is not None else {}),
            },
            **({"reranker_model": kb.reranker.name} if kb.reranker is not None else {}),
            **store,
        }
    )


def _runtime(encoder: Any) -> dict[str, Any]:
    """What runs an encoder and why; for an embedding model also per lane, with the timings
    the choice was made from."""
    out: dict[str, Any] = {"runtime": encoder.runtime, "note": encoder.runtime_note}
    lanes = getattr(encoder, "lanes", None)
    if lanes:
        out["lanes"] = {lane: {"runtime": c.runtime, "why": c.why} for lane, c in lanes.items()}
        out["cores"] = encoder.cores
    timings = getattr(encoder, "timings", None)
    if timings:
        out["timings"] = [
            {"runtime": m.runtime, "bulk_texts_per_s": m.bulk_texts_per_s, "query_ms": m.query_ms}
            for m in timings
        ]
    return out


@get(
    "/metrics",
    sync_to_thread=False,
    media_type="text/plain; version=0.0.4",
    guards=[require_metrics_key],
    opt={"access": "admin", "collection": "*"},  # the metrics name every collection
    responses=error_responses(401, 403, v1=False),
)
def metrics(state: State) -> bytes:
    data: bytes = state["metrics"].render()
    return data
