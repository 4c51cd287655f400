"""The one PEFT/transformers warning silenced around model wrapping, and only that one."""

from __future__ import annotations

import contextlib
import warnings

from peft import LoraConfig, get_peft_model
from transformers import AutoModel

from rag_service import peft_compat
from rag_service.settings import bundled_embedding_model

DEPRECATION = "`is_gradient_checkpointing` is deprecated"


def _wrap(quiet: bool) -> list[str]:
    model = AutoModel.from_pretrained(bundled_embedding_model())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with peft_compat.wrapping() if quiet else contextlib.nullcontext():
            get_peft_model(model, LoraConfig(r=2, target_modules=["query"]))
            warnings.warn("something else", FutureWarning, stacklevel=1)
    return [str(w.message) for w in seen]


def test_wrapping_is_quiet_about_the_deprecation_only():
    assert any(DEPRECATION in m for m in _wrap(quiet=False))  # what users saw
    quiet = _wrap(quiet=True)
    assert not any(DEPRECATION in m for m in quiet)
    assert "something else" in quiet
