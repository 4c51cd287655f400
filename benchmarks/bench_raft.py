"""RAFT on a real corpus: ``rag-train raft`` on the Python tutorial, the bundled SmolLM2, CPU.

The reST sources of the Python 3.11 tutorial (Debian's python3.11-doc, see
:func:`benchmarks.common.python_doc_files`) go into a collection with 128-token chunks, a
``rag-service serve`` child process with the local backend serves it, and the command runs
as a user would run it (in process, over HTTP): template questions, examples with ``top_k``
sources (short prompts: LoRA on two shared cores trains at about 150 tokens/s), a LoRA
adapter, and the held-out evaluation through the service's chat path, base + RAG vs
adapter + RAG. Recorded: examples built, seconds per step, training time and throughput, the
table, and each target (the adapter cites the answering chunk in >= 80% of held-out answers,
key-span rate >= +20 points over base, refusal when the chunk is absent >= 70%) met or not.

    python -m benchmarks.bench_raft [--max-chunks 220] [--epochs 2] [--top-k 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Server, python_doc_files, write_result

TARGETS = {"cites_oracle": 0.80, "key_span_gain": 0.20, "refusal": 0.70}


def _ingest(url: str, collection: str, chunk_tokens: int) -> dict[str, Any]:
    docs = [
        {"id": doc_id, "text": text, "metadata": {"source": "python3.11-doc"}}
        for doc_id, text in python_doc_files()
        if doc_id.startswith("tutorial/")
    ]
    with httpx.Client(base_url=url, timeout=600) as http:
        http.post(
            "/v1/collections",
            json={"name": collection, "chunk_tokens": chunk_tokens, "chunk_overlap": 16},
        ).raise_for_status()
        started = time.perf_counter()
        for i in range(0, len(docs), 4):
            http.post(
                f"/v1/collections/{collection}/documents", json={"documents": docs[i : i + 4]}
            ).raise_for_status()
        seconds = time.perf_counter() - started
        info = next(
            c for c in http.get("/v1/collections").json()["data"] if c["name"] == collection
        )
    return {"documents": info["documents"], "chunks": info["chunks"], "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-chunks", type=int, default=220)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the run here")
    args = parser.parse_args(argv)

    from trainers.raft import RaftConfig, run

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-raft-"))
    adapters = work / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    env = {"RAG_BACKEND": "local", "RAG_ADAPTERS_DIR": str(adapters), "RAG_MAX_NEW_TOKENS": "128"}
    load_before = os.getloadavg()
    with Server(work / "data", env) as server:
        corpus = _ingest(server.url, "pytutorial", args.chunk_tokens)
        cfg = RaftConfig(
            collection="pytutorial",
            output_dir=adapters / "pytutorial-raft",
            url=server.url,
            adapters_dir=adapters,
            max_chunks=args.max_chunks,
            top_k=args.top_k,
            seed=args.seed,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            save_steps=25,
            eval_steps=25,
            load="pytutorial-raft",
        )
        started = time.perf_counter()
        result = run(cfg)
        total = time.perf_counter() - started
    training = result["training"]
    evaluation = result["evaluation"]
    base, tuned = evaluation["base"], evaluation["adapter"]
    gain = (tuned["key_span"] or 0) - (base["key_span"] or 0)
    figures = {
        "corpus": corpus,
        "data": {
            "chunks_sampled": result["data"]["chunks_sampled"],
            "question_kinds": result["data"]["kinds"],
            "writer": result["data"]["writer"],
            "splits": result["data"]["counts"],
            "retrieval_top_k_hit_rate": result["data"]["retrieval_top_k_hit_rate"],
        },
        "training": {
            k: training.get(k)
            for k in (
                "global_step",
                "epochs",
                "train_examples",
                "seconds",
                "tokens_per_second",
                "train_loss_first",
                "train_loss_last",
                "eval_loss_best",
            )
        },
        "base": base,
        "adapter": tuned,
        "key_span_gain": round(gain, 4),
        "targets": {
            "cites_oracle": {
                "target": TARGETS["cites_oracle"],
                "measured": tuned["cites_oracle"],
                "met": (tuned["cites_oracle"] or 0) >= TARGETS["cites_oracle"],
            },
            "key_span_gain": {
                "target": TARGETS["key_span_gain"],
                "measured": round(gain, 4),
                "met": gain >= TARGETS["key_span_gain"],
            },
            "refusal": {
                "target": TARGETS["refusal"],
                "measured": tuned["refusal"],
                "met": (tuned["refusal"] or 0) >= TARGETS["refusal"],
            },
        },
        "loaded_as": evaluation["loaded_as"],
        "total_seconds": round(total, 1),
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    params = {
        **vars(args),
        "work_dir": str(work),
        "chunk_overlap": 16,
        "question_writer": "template",
        "p_no_oracle": cfg.p_no_oracle,
        "val": cfg.val,
        "test": cfg.test,
        "lora_r": cfg.lora_r,
    }
    write_result("raft", params, figures)


if __name__ == "__main__":
    main()
