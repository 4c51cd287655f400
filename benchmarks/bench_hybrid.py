"""Hybrid search weights, chosen by measurement: a grid of alpha x fusion on every Q/A set.

Each set's corpus goes into a real server; ``POST /v1/collections/{name}/evaluate`` scores dense
and, for each alpha (weight of the dense score) and fusion (``convex``: the cosine plus the
BM25 score over its best; ``rrf``: weighted reciprocal rank), hybrid: recall@1/@5/@10 and
MRR@10 over every question of the set, and separately over the set's hand-written rephrasings
(a user's own wording, where BM25 finds fewer of the document's words). The recommended
default is the setting whose worst difference to dense (recall@1 or recall@5, on any set) is
highest: it must be >= 0 for the default to be safe. ``RAG_HYBRID_ALPHA`` /
``RAG_HYBRID_FUSION`` take it; the README quotes the grid.

    python -m benchmarks.bench_hybrid [--sets debian_faq python_docs] [--alphas 0.8 0.88 ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Server, write_result
from benchmarks.datasets import LOADERS, ingest, load, read_rephrasings

ALPHAS = (0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.95)
FUSIONS = ("convex", "rrf")


def evaluate(client: httpx.Client, collection: str, rows: list[dict[str, str]], **extra: Any):
    resp = client.post(f"/v1/collections/{collection}/evaluate", json={"rows": rows, **extra})
    resp.raise_for_status()
    return resp.json()["modes"]


def figures_of(mode: dict[str, float]) -> dict[str, float]:
    return {k: mode[k] for k in ("recall@1", "recall@5", "recall@10", "mrr@10")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        Server(Path(tmp), {}) as server,
        httpx.Client(base_url=server.url, timeout=1800) as client,
    ):
        for name in args.sets:
            qaset = load(name)
            t = time.perf_counter()
            ingest(client, name, qaset)
            question_sets = {
                name: [q.as_row() for q in qaset.questions],
                f"{name}_rephrased": [
                    {"question": r.rephrased, "document_id": r.document_id}
                    for r in read_rephrasings(qaset)
                ],
            }
            for label, rows in question_sets.items():
                dense = evaluate(client, name, rows, modes=["dense"])["dense"]
                grid: dict[str, dict[str, float]] = {}
                for fusion in FUSIONS:
                    for alpha in args.alphas:
                        got = evaluate(
                            client, name, rows, modes=["hybrid"], alpha=alpha, fusion=fusion
                        )
                        grid[f"{fusion}@{alpha}"] = figures_of(got["hybrid"])
                results[label] = {
                    "documents": len(qaset.documents),
                    "questions": len(rows),
                    "dense": figures_of(dense),
                    "dense_latency_p50_ms": dense["latency_p50_ms"],
                    "hybrid": grid,
                    "seconds": round(time.perf_counter() - t, 1),
                }
                print(label, results[label]["dense"], flush=True)

    def worst(setting: str) -> float:
        return min(
            results[s]["hybrid"][setting][k] - results[s]["dense"][k]
            for s in results
            for k in ("recall@1", "recall@5")
        )

    def gain(setting: str) -> float:
        return sum(
            results[s]["hybrid"][setting]["recall@1"] - results[s]["dense"]["recall@1"]
            for s in results
        )

    settings = list(next(iter(results.values()))["hybrid"])
    best = max(settings, key=lambda s: (worst(s) >= 0, round(worst(s), 4), gain(s)))
    fusion, alpha = best.split("@")
    figures = {
        "sets": results,
        "recommended": {
            "fusion": fusion,
            "alpha": float(alpha),
            "worst_difference_to_dense": round(worst(best), 4),
            "recall_at_1_gain_summed": round(gain(best), 4),
            "safe": worst(best) >= 0,
        },
    }
    write_result("quality_hybrid_grid", {"sets": args.sets, "alphas": args.alphas}, figures)


if __name__ == "__main__":
    main()
