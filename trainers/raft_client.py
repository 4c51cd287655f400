"""The running service, as ``rag-train raft`` uses it: over HTTP, like ``rag-service ingest``.

``rag-train raft`` reads the knowledge, retrieves distractors and evaluates through the same
HTTP API every other client uses, not by opening the store: the store may be PostgreSQL on
another host, the service may be several replicas, and the chat path it evaluates (retrieval,
prompt, generation, adapters) exists only inside the running service. The URL is ``--url``,
else ``RAG_URL``, else ``http://RAG_HOST:RAG_PORT`` (:func:`rag_service.cli.client.default_url`);
the key is ``--api-key`` or ``RAG_API_KEY``.

:class:`ServiceClient` wraps one ``httpx.Client`` (a Litestar ``TestClient`` works too, being
one) and turns every failure into :class:`ServiceError` with the service's own message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from rag_service.cli.client import error_message

__all__ = ["ServiceClient", "ServiceError"]

PAGE = 1000  # documents per page when listing a collection


class ServiceError(RuntimeError):
    """The service answered with an error or could not be reached; the message says which."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServiceClient:
    """The calls ``rag-train raft`` makes; ``http`` is an ``httpx.Client`` with the base URL
    and the key's header set."""

    def __init__(self, http: Any, url: str = "") -> None:
        self.http = http
        self.url = url or str(getattr(http, "base_url", ""))

    @classmethod
    def connect(cls, url: str, api_key: str | None, timeout: float = 600.0) -> ServiceClient:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return cls(httpx.Client(base_url=url, headers=headers, timeout=timeout), url)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        import httpx

        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceError(f"cannot reach the service at {self.url}: {exc}") from exc
        if resp.status_code >= 400:
            raise ServiceError(
                f"{what} failed ({resp.status_code}): {error_message(resp)}", resp.status_code
            )
        return resp.json() if resp.content else None

    # ---- knowledge -------------------------------------------------------------------------
    def collection(self, name: str) -> dict[str, Any]:
        """The collection's record (chunk sizes, embedding model); ServiceError 404 when the
        service has no such collection."""
        listed = self._call("GET", "/v1/collections", "listing collections")
        for row in listed["data"]:
            if row["name"] == name:
                return dict(row)
        names = ", ".join(sorted(r["name"] for r in listed["data"])) or "none"
        raise ServiceError(
            f"collection {name!r} does not exist (collections here: {names})", status=404
        )

    def document_ids(self, collection: str) -> Iterator[str]:
        after = ""
        while True:
            params: dict[str, Any] = {"limit": PAGE, **({"after": after} if after else {})}
            page = self._call(
                "GET", f"/v1/collections/{collection}/documents", "listing documents", params=params
            )
            for doc in page["data"]:
                yield str(doc["id"])
            if not page["has_more"] or not page["data"]:
                return
            after = page["last_id"]

    def document(self, collection: str, doc_id: str) -> dict[str, Any]:
        path = f"/v1/collections/{collection}/documents/{quote(doc_id, safe='/')}"
        return dict(self._call("GET", path, f"reading document {doc_id!r}"))

    def search(self, collection: str, query: str, top_k: int) -> list[dict[str, Any]]:
        """Search with the collection's defaults (mode, fusion, rerank), as chat does."""
        body = {"query": query, "top_k": top_k}
        out = self._call("POST", f"/v1/collections/{collection}/search", "searching", json=body)
        return list(out["results"])

    # ---- generation ------------------------------------------------------------------------
    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/chat/completions", "chat", json=body))

    def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        body = {"name": name, "path": path}
        return dict(self._call("POST", "/v1/adapters", f"loading adapter {name!r}", json=body))

    def unload_adapter(self, name: str) -> None:
        self._call("DELETE", f"/v1/adapters/{name}", f"unloading adapter {name!r}")

    def adapters(self) -> list[str]:
        listed = self._call("GET", "/v1/adapters", "listing adapters")
        return [str(a["name"]) for a in listed["data"]]
