"""Run every benchmark in sequence (``make bench``); each writes benchmarks/results/*.json."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    "bench_embedding",
    "bench_ingest",
    "bench_quality",
    "bench_search",
    "bench_postgres",
    "bench_chat",
    "bench_soak",
]


def main() -> int:
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *sys.argv[1:]])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
