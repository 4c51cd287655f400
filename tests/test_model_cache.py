"""The per-user model cache: where it is, and one conversion of the bundled model however many
processes ask for it at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rag_service.model_cache import BUNDLED_NAME, cache_dir
from rag_service.settings import Settings


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"RAG_CACHE_DIR": "/srv/cache"}, "/srv/cache"),
        ({"RAG_CACHE_DIR": "/srv/cache", "XDG_CACHE_HOME": "/x"}, "/srv/cache"),
        ({"XDG_CACHE_HOME": "/x", "HOME": "/home/u"}, "/x/rag-service"),
        ({"HOME": "/home/u"}, "/home/u/.cache/rag-service"),
    ],
)
def test_cache_dir(env, want):
    assert cache_dir(env) == Path(want)


def test_settings_take_the_cache_from_the_environment(tmp_path):
    assert Settings.from_env({"RAG_CACHE_DIR": str(tmp_path)}).cache_path == tmp_path
    # The data directory no longer decides where the converted model goes.
    moved = Settings.from_env({"RAG_DATA_DIR": str(tmp_path / "d"), "RAG_CACHE_DIR": "/c"})
    assert moved.cache_path == Path("/c")


CONVERT = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from rag_service.model_cache import materialize_bundled_model
print(materialize_bundled_model(Path(sys.argv[1])))
"""


def test_two_processes_converting_at_once_make_one_model(tmp_path):
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT, str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    target = cache / BUNDLED_NAME
    assert {out.strip() for out, _ in outputs} == {str(target)}
    assert sum("converting" in err for _, err in outputs) == 1  # the second waited for it
    assert sorted(p.name for p in cache.iterdir()) == [".lock", BUNDLED_NAME]  # no leftovers
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(target).vocab_size > 0
    assert AutoTokenizer.from_pretrained(target)("hello")["input_ids"]
    assert list(target.glob("*.safetensors"))

    # The trainers find the same copy through RAG_CACHE_DIR, without converting again.
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "from trainers.sft import resolve_base_model; print(resolve_base_model(''))",
        ],
        env={**os.environ, "RAG_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(target)
