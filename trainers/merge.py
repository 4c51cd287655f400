"""Adapters on a base model: loading with checks, and merging into a standalone model.

A merged directory is a plain transformers model (safetensors + tokenizer with its chat
template) that transformers and vLLM load without PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from rag_service import peft_compat
from trainers.sft import TrainingError, load_base

__all__ = ["load_with_adapter", "merge"]


def load_with_adapter(base: Path, adapter: Path) -> tuple[Any, Any]:
    """Base model with a PEFT adapter applied; clear errors for a mismatch."""
    from peft import PeftModel

    config_path = adapter / "adapter_config.json"
    if not config_path.exists():
        raise TrainingError(f"{adapter} is not a PEFT adapter (no adapter_config.json)")
    if not (adapter / "adapter_model.safetensors").exists():
        raise TrainingError(
            f"{adapter} has no adapter_model.safetensors (only safetensors adapters are loaded)"
        )
    model, tokenizer = load_base(base)
    config = json.loads(config_path.read_text())
    targets = config.get("target_modules") or []
    if isinstance(targets, list):
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise TrainingError(
                f"adapter {adapter} targets modules {missing} that base model "
                f"{base} does not have: it was trained for another base"
            )
    try:
        with peft_compat.wrapping():
            model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TrainingError(f"adapter {adapter} does not fit base model {base}: {exc}") from exc
    return model, tokenizer


def merge(base: Path, adapter: Path, out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"{out} exists and is not empty")
    model, tokenizer = load_with_adapter(base, adapter)
    merged = model.merge_and_unload()
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
