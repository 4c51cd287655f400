"""Retrieval quality of every pipeline the service offers, on two real Q/A sets and two splits.

Sets (:mod:`benchmarks.datasets`): the Debian FAQ (questions -> answers) and Python 3.11
documentation sections (heading -> section). Splits: ``by_document`` (test questions ask about
documents no training question touches) and ``by_phrasing`` (test questions are hand-written
rephrasings of training questions: a support desk whose new tickets ask about known articles).

Pipelines, each measured on the test questions through a real server's evaluate endpoint
(recall@1/@5/@10, MRR@10):

* ``dense``, ``hybrid``: the bundled MiniLM over the documents; hybrid with the service's
  default weights.
* ``keys``: the training questions attached to their documents as known-question keys
  (``POST /v1/collections/{name}/questions``), dense and hybrid.
* ``tuned``: ``rag-train embed`` on the training questions, the collection moved to that model
  with ``POST /v1/collections/{name}/reindex``; then with keys too (``tuned_keys``).
* ``rerank``: ``rag-train rerank`` on the training questions, served as ``RAG_RERANKER_MODEL``,
  over the candidates of ``dense``, ``keys`` and ``tuned_keys`` (``rerank_depth`` 20).

Training times are wall-clock on this machine; a trained model its own validation found worse
than base is still measured here (``--allow-worse``) and reported as flagged.

    python -m benchmarks.bench_quality [--sets debian_faq python_docs] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS, ROOT, Server, write_result
from benchmarks.datasets import (
    LOADERS,
    QASet,
    Question,
    Split,
    by_document,
    by_phrasing,
    ingest,
    load,
)

RERANK_DEPTH = 20
METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10")


def attach_keys(client: httpx.Client, collection: str, questions: list[Question]) -> None:
    rows = [{"document_id": q.document_id, "question": q.question} for q in questions]
    for i in range(0, len(rows), 500):
        client.post(
            f"/v1/collections/{collection}/questions", json={"questions": rows[i : i + 500]}
        ).raise_for_status()


def evaluate(
    client: httpx.Client, collection: str, test: list[Question], modes: list[str]
) -> dict[str, dict[str, float]]:
    body: dict[str, Any] = {"rows": [q.as_row() for q in test], "modes": modes}
    if "rerank" in modes:
        body["rerank_depth"] = RERANK_DEPTH
    resp = client.post(f"/v1/collections/{collection}/evaluate", json=body)
    resp.raise_for_status()
    return {
        mode: {k: round(v[k], 4) for k in (*METRICS, "latency_p50_ms")}
        for mode, v in resp.json()["modes"].items()
    }


def reindex(client: httpx.Client, collection: str, model: Path) -> float:
    t = time.perf_counter()
    client.post(
        f"/v1/collections/{collection}/reindex", json={"embedding_model": str(model), "force": True}
    ).raise_for_status()
    while True:
        job = client.get(f"/v1/collections/{collection}/reindex").json()
        if job["state"] == "done":
            return round(time.perf_counter() - t, 1)
        if job["state"] == "failed":
            raise RuntimeError(f"reindex of {collection} failed: {job}")
        time.sleep(0.5)


def train(kind: str, out: Path, train_file: Path, corpus: Path, epochs: int) -> dict[str, Any]:
    """``rag-train embed|rerank``; its wall time and what its own validation said."""
    t = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainers.cli",
            kind,
            "--qa-file",
            str(train_file),
            "--corpus",
            str(corpus),
            "--output-dir",
            str(out),
            "--epochs",
            str(epochs),
            "--allow-worse",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"rag-train {kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "train_seconds": round(time.perf_counter() - t, 1),
        "validation_base": metrics.get("base"),
        "validation_trained": metrics.get("trained"),
        "better_than_base": metrics.get("better_than_base"),
        "epochs_run": metrics.get("epochs_run"),
        "best_epoch": metrics.get("best_epoch"),
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        models = data_dir / "models"
        models.mkdir(parents=True)
        plan: list[tuple[str, str, QASet, Split, Path]] = []
        with (
            Server(data_dir, {}) as server,
            httpx.Client(base_url=server.url, timeout=3600) as client,
        ):
            for set_name in args.sets:
                qaset = load(set_name)
                corpus = write_jsonl(
                    Path(tmp) / f"{set_name}-corpus.jsonl",
                    [d.as_upsert() for d in qaset.documents],
                )
                ingest(client, set_name, qaset)
                for split_name, split in (
                    ("by_document", by_document(qaset, seed=0)),
                    ("by_phrasing", by_phrasing(qaset)),
                ):
                    label = f"{set_name}/{split_name}"
                    base = f"{set_name}"
                    keys = f"{set_name}-{split_name}-keys"
                    tuned = f"{set_name}-{split_name}-tuned"
                    print(label, "train", len(split.train), "test", len(split.test), flush=True)
                    result: dict[str, Any] = {
                        "epochs": args.epochs,
                        "documents": len(qaset.documents),
                        "train_questions": len(split.train),
                        "test_questions": len(split.test),
                    }
                    got = evaluate(client, base, split.test, ["dense", "hybrid"])
                    result["dense"], result["hybrid"] = got["dense"], got["hybrid"]
                    ingest(client, keys, qaset)
                    attach_keys(client, keys, split.train)
                    got = evaluate(client, keys, split.test, ["dense", "hybrid"])
                    result["keys"], result["keys_hybrid"] = got["dense"], got["hybrid"]
                    train_file = write_jsonl(
                        Path(tmp) / f"{set_name}-{split_name}-train.jsonl",
                        [q.as_row() for q in split.train],
                    )
                    embed_dir = models / f"embed-{set_name}-{split_name}"
                    result["embed_training"] = train(
                        "embed", embed_dir, train_file, corpus, args.epochs
                    )
                    ingest(client, tuned, qaset)
                    result["reindex_seconds"] = reindex(client, tuned, embed_dir)
                    got = evaluate(client, tuned, split.test, ["dense", "hybrid"])
                    result["tuned"], result["tuned_hybrid"] = got["dense"], got["hybrid"]
                    attach_keys(client, tuned, split.train)
                    result["tuned_keys"] = evaluate(client, tuned, split.test, ["dense"])["dense"]
                    rerank_dir = models / f"rerank-{set_name}-{split_name}"
                    result["rerank_training"] = train(
                        "rerank", rerank_dir, train_file, corpus, args.epochs
                    )
                    figures[label] = result
                    plan.append((label, split_name, qaset, split, rerank_dir))
                    print(label, json.dumps(result), flush=True)
        # Each reranker is the service's one RAG_RERANKER_MODEL: a restart per split, same data.
        for label, split_name, qaset, split, rerank_dir in plan:
            set_name = qaset.name
            with (
                Server(data_dir, {"RAG_RERANKER_MODEL": str(rerank_dir)}) as server,
                httpx.Client(base_url=server.url, timeout=3600) as client,
            ):
                result = figures[label]
                result["rerank"] = evaluate(client, set_name, split.test, ["rerank"])["rerank"]
                result["keys_rerank"] = evaluate(
                    client, f"{set_name}-{split_name}-keys", split.test, ["rerank"]
                )["rerank"]
                result["tuned_keys_rerank"] = evaluate(
                    client, f"{set_name}-{split_name}-tuned", split.test, ["rerank"]
                )["rerank"]
            pipelines = {k: v for k, v in result.items() if isinstance(v, dict) and "mrr@10" in v}
            best = max(pipelines, key=lambda k: (pipelines[k]["recall@1"], pipelines[k]["mrr@10"]))
            result["best"] = {
                "pipeline": best,
                "recall@1_gain_over_dense": round(
                    pipelines[best]["recall@1"] - result["dense"]["recall@1"], 4
                ),
            }
            print(label, "best", result["best"], flush=True)
    # Sets measured in separate runs (one set a run, say) gather in one file: a run replaces
    # the entries of the splits it measured and keeps the others.
    previous = RESULTS / "quality_pipelines.json"
    if previous.exists():
        figures = {**json.loads(previous.read_text())["figures"], **figures}
    write_result("quality_pipelines", {"rerank_depth": RERANK_DEPTH}, figures)


if __name__ == "__main__":
    main()
