"""Retrieval quality on a real Q/A source: the Debian FAQ (package debian-faq).

Each answer is a document; each question is a query whose right answer is its own section.
Recall@k = share of questions whose answer document is among the first k distinct documents,
dense and hybrid (BM25 via SQLite FTS5 fused with dense by reciprocal rank fusion).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import httpx

from benchmarks.common import Server, faq_pairs, write_result


def ranked_documents(client: httpx.Client, query: str, mode: str) -> list[str]:
    resp = client.post(
        "/v1/collections/faq/search", json={"query": query, "top_k": 30, "mode": mode}
    )
    resp.raise_for_status()
    seen: list[str] = []
    for r in resp.json()["results"]:
        if r["document_id"] not in seen:
            seen.append(r["document_id"])
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    pairs = faq_pairs()
    with (
        tempfile.TemporaryDirectory() as tmp,
        Server(Path(tmp), {}) as server,
        httpx.Client(base_url=server.url, timeout=600) as client,
    ):
        docs = [{"id": anchor, "text": answer} for anchor, _, answer in pairs]
        for i in range(0, len(docs), 32):
            client.post(
                "/v1/collections/faq/documents", json={"documents": docs[i : i + 32]}
            ).raise_for_status()
        figures: dict = {
            "questions": len(pairs),
            "chunks": client.get("/v1/collections").json()["data"][0]["chunks"],
        }
        for mode in ("dense", "hybrid"):
            hits = {1: 0, 5: 0}
            for anchor, question, _ in pairs:
                ranked = ranked_documents(client, question, mode)
                for k in hits:
                    hits[k] += anchor in ranked[:k]
            figures[mode] = {f"recall_at_{k}": round(v / len(pairs), 4) for k, v in hits.items()}
    write_result("quality_debian_faq", {}, figures)


if __name__ == "__main__":
    main()
