"""Chat JSONL data: validation with line numbers, dedup, seeded split, stats, conversion.

One example per line: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}]}``
with at least one assistant turn, the last turn being the assistant's.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Problem",
    "convert_records",
    "dedup",
    "example_key",
    "iter_jsonl",
    "load_examples",
    "split",
    "validate_file",
    "write_jsonl",
]

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Problem:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def iter_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                yield lineno, line


def check_example(obj: Any) -> str | None:
    """Why ``obj`` is not a valid chat example, or None."""
    if not isinstance(obj, dict) or "messages" not in obj:
        return "no 'messages' field"
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        if m.get("role") not in ROLES:
            return f"message {i} has bad role {m.get('role')!r} (system, user or assistant)"
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"message {i} has empty or non-string content"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    if messages[-1]["role"] != "assistant":
        return "last turn is not the assistant's"
    return None


def validate_file(
    path: Path,
    *,
    count_tokens: Callable[[list[dict[str, str]]], int] | None = None,
    max_tokens: int | None = None,
) -> tuple[list[dict[str, Any]], list[Problem]]:
    """(valid examples, problems by line)."""
    good: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for lineno, line in iter_jsonl(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(lineno, f"not JSON ({exc.msg})"))
            continue
        reason = check_example(obj)
        if reason is None and count_tokens is not None and max_tokens is not None:
            n = count_tokens(obj["messages"])
            if n > max_tokens:
                reason = f"{n} tokens, longer than the max length {max_tokens}"
        if reason is None:
            good.append({"messages": obj["messages"]})
        else:
            problems.append(Problem(lineno, reason))
    return good, problems


def load_examples(path: Path) -> list[dict[str, Any]]:
    """Valid examples; raises ValueError listing the first problems."""
    good, problems = validate_file(path)
    if problems:
        shown = "; ".join(str(p) for p in problems[:5])
        raise ValueError(
            f"{path}: {len(problems)} bad lines ({shown}); run rag-train data validate"
        )
    if not good:
        raise ValueError(f"{path}: no examples")
    return good


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def example_key(example: dict[str, Any], *, normalised: bool = True) -> str:
    parts = [
        (m["role"], _normalise(m["content"]) if normalised else m["content"])
        for m in example["messages"]
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def dedup(
    examples: Iterable[dict[str, Any]], *, normalised: bool = True
) -> tuple[list[dict[str, Any]], int]:
    """(unique examples in first-seen order, number dropped)."""
    seen: set[str] = set()
    out = []
    dropped = 0
    for ex in examples:
        key = example_key(ex, normalised=normalised)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        out.append(ex)
    return out, dropped


def split(
    examples: list[dict[str, Any]], *, train: float, val: float, test: float, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Deterministic split after dedup (normalised), so no example leaks across splits."""
    total = train + val + test
    if abs(total - 1.0) > 1e-6 or min(train, val, test) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1 (got {total:g})")
    unique, _ = dedup(examples)
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    n_train = round(len(unique) * train)
    n_val = round(len(unique) * val)
    parts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    return {name: [unique[i] for i in idx] for name, idx in parts.items()}


def convert_records(
    records: Iterable[tuple[int, dict[str, Any]]], *, system: str | None = None
) -> tuple[list[dict[str, Any]], list[Problem]]:
    """From ``{"prompt", "completion"}`` or ``{"user", "assistant"}`` records to chat form."""
    out, problems = [], []
    for lineno, rec in records:
        if not isinstance(rec, dict):
            problems.append(Problem(lineno, "not an object"))
            continue
        if "prompt" in rec and "completion" in rec:
            user, assistant = rec["prompt"], rec["completion"]
        elif "user" in rec and "assistant" in rec:
            user, assistant = rec["user"], rec["assistant"]
        elif "messages" in rec:
            user, assistant = None, None
        else:
            problems.append(Problem(lineno, "expected prompt/completion or user/assistant"))
            continue
        if user is None:
            example = {"messages": rec["messages"]}
        else:
            messages = [{"role": "system", "content": system}] if system else []
            messages += [
                {"role": "user", "content": str(user).strip()},
                {"role": "assistant", "content": str(assistant).strip()},
            ]
            example = {"messages": messages}
        reason = check_example(example)
        if reason:
            problems.append(Problem(lineno, reason))
        else:
            out.append(example)
    return out, problems


def write_jsonl(path: Path, examples: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex, ensure_ascii=False) + "\n")
            n += 1
    return n
