"""Known questions as keys, measured on the Debian FAQ with rephrased questions.

The corpus is the FAQ's answers (one document each). The test questions are hand-written
rephrasings of FAQ questions (``benchmarks/data/debian_faq_rephrased.jsonl``): new wording,
same documents, the case of a help desk whose new tickets ask about answered topics in other
words. Two runs on one collection, through the evaluate endpoint:

1. ``answers``: only the answers are indexed (plain dense and hybrid search);
2. ``answers+questions``: the FAQ's original questions are attached to their documents as
   known questions (``POST /v1/collections/{name}/questions``), no training of any kind.

Recall@k counts a rephrasing as found when its document is among the first k documents.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Server, write_result
from benchmarks.datasets import by_phrasing, debian_faq

MODES = ("dense", "hybrid")


def evaluate(client: httpx.Client, rows: list[dict[str, str]]) -> dict[str, Any]:
    resp = client.post("/v1/collections/faq/evaluate", json={"rows": rows, "modes": list(MODES)})
    resp.raise_for_status()
    body = resp.json()
    return {
        mode: {k: round(v, 4) for k, v in figures.items() if k != "latency_p50_ms"}
        | {"latency_p50_ms": figures["latency_p50_ms"]}
        for mode, figures in body["modes"].items()
    } | {"evaluated": body["evaluated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    qaset = debian_faq()
    split = by_phrasing(qaset)
    tests = [q.as_row() for q in split.test]
    with (
        tempfile.TemporaryDirectory() as tmp,
        Server(Path(tmp), {}) as server,
        httpx.Client(base_url=server.url, timeout=600) as client,
    ):
        docs = [d.as_upsert() for d in qaset.documents]
        for i in range(0, len(docs), 32):
            client.post(
                "/v1/collections/faq/documents", json={"documents": docs[i : i + 32]}
            ).raise_for_status()
        figures: dict[str, Any] = {"documents": len(docs), "test_questions": len(tests)}
        figures["answers"] = evaluate(client, tests)
        keys = [q.as_row() for q in split.train]
        added = 0
        for i in range(0, len(keys), 1000):
            resp = client.post(
                "/v1/collections/faq/questions", json={"questions": keys[i : i + 1000]}
            )
            resp.raise_for_status()
            added += resp.json()["added"]
        figures["known_questions"] = added
        figures["answers+questions"] = evaluate(client, tests)
        info = client.get("/v1/collections").json()["data"][0]
        figures["chunks"], figures["questions"] = info["chunks"], info["questions"]
        for mode in MODES:
            before, after = figures["answers"][mode], figures["answers+questions"][mode]
            figures.setdefault("gain", {})[mode] = {
                k: round(after[k] - before[k], 4) for k in ("recall@1", "recall@5", "mrr@10")
            }
    write_result("questions_debian_faq", {"split": "by_phrasing"}, figures)


if __name__ == "__main__":
    main()
