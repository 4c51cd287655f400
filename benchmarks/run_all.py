"""Run the benchmarks in sequence (``make bench``); each writes benchmarks/results/*.json.

The default set takes about an hour on a 2-core machine. ``--all`` adds the long ones, which
train models on the CPU: the retrieval pipelines (``bench_quality``: embedder and reranker
training on two Q/A sets, one to two hours), fine-tuning (``bench_finetune``) and adapter
serving (``bench_adapters``). ``--only NAME ...`` runs the ones named.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

BENCHMARKS = [
    "bench_embedding",
    "bench_ingest",
    "bench_search",
    "bench_hybrid",
    "bench_questions",
    "bench_postgres",
    "bench_chat",
    "bench_soak",
    "bench_hardening",
]
LONG = ["bench_quality", "bench_finetune", "bench_adapters"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--all", action="store_true", help="also the long benchmarks: " + ", ".join(LONG)
    )
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS + LONG, help="run only these")
    args = parser.parse_args()
    names = args.only or (BENCHMARKS + LONG if args.all else BENCHMARKS)
    for name in names:
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
