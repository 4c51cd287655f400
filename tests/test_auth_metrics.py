from __future__ import annotations

import logging

from tests.support import error_of


def test_api_key_guards_v1_only(make_client):
    client = make_client(api_key="s3cret")
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
    ):
        for method, path, body in (
            ("GET", "/v1/collections", None),
            ("POST", "/v1/collections/kb/documents", {"documents": [{"id": "a", "text": "x"}]}),
            ("POST", "/v1/collections/kb/search", {"query": "x"}),
            ("POST", "/v1/embeddings", {"input": "x"}),
            ("DELETE", "/v1/collections/kb", None),
        ):
            resp = client.request(method, path, json=body, headers=headers)
            assert resp.status_code == 401, (method, path, headers)
            assert error_of(resp)["type"] == "authentication_error"
    ok = {"Authorization": "Bearer s3cret"}
    resp = client.post(
        "/v1/collections/kb/documents", json={"documents": [{"id": "a", "text": "x"}]}, headers=ok
    )
    assert resp.status_code == 200
    assert client.get("/v1/collections", headers=ok).json()["data"][0]["documents"] == 1


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_public_host_without_key_warns(make_client):
    logger = logging.getLogger("rag_service.app")
    for host, key, expect in (
        ("0.0.0.0", None, True),
        ("127.0.0.1", None, False),
        ("0.0.0.0", "k", False),
    ):
        records = _Records()
        logger.addHandler(records)
        try:
            make_client(host=host, api_key=key, data_dir=None)
        finally:
            logger.removeHandler(records)
        warned = any("without RAG_API_KEY" in m for m in records.messages)
        assert warned is expect, (host, key, records.messages)


def test_prometheus_metrics(client):
    client.post(
        "/v1/collections/kb/documents", json={"documents": [{"id": "a", "text": "hello metrics"}]}
    )
    client.post("/v1/collections/kb/search", json={"query": "hello"})
    client.post("/v1/collections/kb/search", json={"query": ""})
    text = client.get("/metrics").text
    assert (
        'rag_http_request_duration_seconds_count{method="POST",'
        'route="/v1/collections/{name}/search",status="200"} 1.0'
    ) in text
    assert 'route="/v1/collections/{name}/search",status="400"} 1.0' in text
    assert "rag_embedding_batch_size_count" in text
    assert "rag_embedding_queue_depth 0.0" in text
    assert 'rag_index_vectors{collection="kb"} 1.0' in text
    assert 'rag_documents_upserted_total{status="created"} 1.0' in text
    assert 'rag_search_duration_seconds_count{mode="dense"} 1.0' in text


def test_event_loop_lag_monitor_counts_stalls_after_readiness_only():
    import asyncio
    import time

    from rag_service.metrics import Metrics

    metrics = Metrics()

    def worst() -> float:
        return metrics.registry.get_sample_value("rag_event_loop_lag_max_seconds") or 0.0

    async def scenario() -> tuple[float, float]:
        watcher = asyncio.create_task(metrics.watch_event_loop(0.01))
        await asyncio.sleep(0.03)
        time.sleep(0.3)  # start-up work blocking the loop...
        metrics.reset_loop_lag_max()  # ...up to readiness: the sample in flight is dropped
        await asyncio.sleep(0.05)
        before = worst()
        time.sleep(0.15)  # a stall while serving
        await asyncio.sleep(0.05)
        watcher.cancel()
        return before, worst()

    before, after = asyncio.run(scenario())
    assert before < 0.1
    assert 0.14 <= after < 0.3
