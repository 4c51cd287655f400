"""Shared benchmark plumbing: where it ran, result files, a real server process, corpora."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"

__all__ = [
    "CACHE",
    "ROOT",
    "Server",
    "environment",
    "fake_upstream",
    "faq_pairs",
    "percentiles",
    "python_doc_files",
    "write_result",
]


def _git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for pkg in (
        "torch",
        "sentence-transformers",
        "faiss-cpu",
        "faiss-gpu-cu12",
        "litestar",
        "numpy",
        "transformers",
        "txtai",
        "httpx",
        "uvicorn",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "git_sha": _git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(name: str, params: dict[str, Any], figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = environment()
    if env["gpu"]:
        name += "_gpu"
    path = RESULTS / f"{name}.json"
    body = {"benchmark": name, "environment": env, "params": params, "figures": figures}
    path.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def device() -> str:
    from rag_service.embedding import resolve_device

    return resolve_device("auto")


def percentiles(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "mean_ms": round(float(a.mean()), 3),
        "n": len(a),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """``rag-service serve`` in a child process, as users run it."""

    data_dir: Path
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    ready_seconds: float = 0.0
    cwd: Path = ROOT  # another checkout serves its own code from its own directory

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.port = self.port or free_port()
        env = {
            **os.environ,
            "RAG_DATA_DIR": str(self.data_dir),
            "RAG_PORT": str(self.port),
            "RAG_LOG_LEVEL": "WARNING",
            **self.env,
        }
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rag_service", "serve"],
            env=env,
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    break
            time.sleep(0.05)
        self.ready_seconds = time.perf_counter() - started
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def fake_upstream() -> Iterator[str]:
    """The fake OpenAI server of the tests (``tests/fake_upstream.py``) in a child process on a
    free loopback port; yields its base URL (``.../v1``)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_upstream", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fake upstream exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url + "/models", timeout=1)
                break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _extract(deb_glob: str, package: str) -> Path:
    target = CACHE / package
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    debs = sorted(CACHE.glob(deb_glob))
    if not debs:
        subprocess.run(["apt-get", "download", package], cwd=CACHE, check=True)
        debs = sorted(CACHE.glob(deb_glob))
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(target)], check=True)
    return target


def python_doc_files(limit: int | None = None) -> Iterator[tuple[str, str]]:
    """(relative id, reST text) from Debian's python3.11-doc sources, in a stable order."""
    root = _extract("python3.11-doc_*.deb", "python3.11-doc")
    base = root / "usr/share/doc/python3.11/html/_sources"
    files = sorted(base.rglob("*.rst.txt"))
    for i, path in enumerate(files):
        if limit is not None and i >= limit:
            return
        yield path.relative_to(base).as_posix(), path.read_text(encoding="utf-8")


def faq_pairs() -> list[tuple[str, str, str]]:
    """(anchor id, question, answer text) from the Debian FAQ (package debian-faq)."""
    from bs4 import BeautifulSoup

    root = _extract("debian-faq_*.deb", "debian-faq")
    pairs = []
    for page in sorted((root / "usr/share/doc/debian/FAQ").glob("*.en.html")):
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        for section in soup.select("div.section"):
            title = section.find(["h2", "h3"], class_="title")
            if title is None:
                continue
            anchor = title.find("a", id=True)
            question = re.sub(r"^\d+(\.\d+)*\.\s*", "", " ".join(title.get_text().split()))
            if not question.endswith("?") or anchor is None:
                continue
            parts = []
            for child in section.find_all(recursive=False):
                if "titlepage" in (child.get("class") or []) or "section" in (
                    child.get("class") or []
                ):
                    continue
                parts.append(" ".join(child.get_text(" ").split()))
            answer = "\n".join(p for p in parts if p)
            if len(answer) > 40:
                pairs.append((str(anchor["id"]), question, answer))
    return pairs
