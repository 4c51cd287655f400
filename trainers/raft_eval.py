"""Held-out evaluation of ``rag-train raft``: the real chat path, base + RAG vs adapter + RAG.

Answerable test questions (their example holds the oracle) are asked through
``POST /v1/chat/completions`` exactly as a user would: the question alone, with
``rag: {"collection": NAME, "top_k": K}``, so the service retrieves, builds its prompt and
generates; greedy decoding. Unanswerable ones (their example has no oracle) need sources that
leave the answering chunk out, which the service's metadata filter cannot say for every
collection (it matches metadata values, and documents need not carry distinguishing ones), so
their prebuilt prompt (the service's system message with the retrieved distractors, made by
the service's own prompt code) is sent with ``rag: {"enabled": false}``: the same generation
path, the same prompt format, only retrieval is done beforehand.

Scores, per model:

``token_f1``
    SQuAD token F1 of the answer (``[n]`` markers left out) against the reference span
    (answerable questions).
``key_span``
    share of answerable answers that contain the reference's key span (case, punctuation,
    articles and whitespace ignored).
``citation_rate``
    share of answerable answers with any ``[n]``.
``cites_oracle``
    among answerable questions whose retrieved sources hold the answer, the share of answers
    citing an answering source: the oracle chunk, or another chunk of its document that holds
    the whole reference answer (overlapping chunks do).
``citation_precision``
    of all distinct ``[n]`` in those answers, the share naming an answering source.
``retrieval_miss``
    answerable questions whose retrieved sources do not hold the answer (the same for both
    models: retrieval does not depend on the adapter); left out of the two scores above.
``refusal``
    share of unanswerable questions answered with a refusal: the fixed sentence taught
    (:data:`~trainers.raft_examples.REFUSAL`) or a plain "do not know" (:data:`REFUSING`).
``false_refusal``
    share of answerable questions with the answer retrieved that were refused anyway.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from trainers.evaluate import normalise, token_f1
from trainers.raft_examples import REFUSAL, oracle_in

__all__ = [
    "METRICS",
    "REFUSING",
    "aggregate",
    "beats",
    "citations",
    "evaluate_split",
    "format_table",
    "is_refusal",
    "score_answerable",
    "score_unanswerable",
]

_CITATION = re.compile(r"\[(\d{1,3})\]")
REFUSING = re.compile(
    r"(do not|don't|does not|doesn't|cannot|can't) (contain|know|find|answer|say|mention)"
    r"|not (contain|mention)\w* (the|an|any) answer|no (relevant )?information",
    re.IGNORECASE,
)
# metric -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "token_f1": ("answer token F1", True),
    "key_span": ("key span present", True),
    "citation_rate": ("citation rate", True),
    "cites_oracle": ("cites the answering chunk", True),
    "citation_precision": ("citation precision", True),
    "refusal": ("refusal, chunk absent", True),
    "false_refusal": ("refusal, chunk present", False),
}


def citations(answer: str) -> list[int]:
    """The distinct source numbers cited as ``[n]``, in order of first citation."""
    out: list[int] = []
    for m in _CITATION.finditer(answer):
        n = int(m.group(1))
        if n not in out:
            out.append(n)
    return out


def is_refusal(answer: str) -> bool:
    return normalise(REFUSAL) in normalise(answer) or REFUSING.search(answer) is not None


def score_answerable(
    answer: str, sources: Sequence[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """One answer to an answerable question, given the sources the chat response carried."""
    cited = citations(answer)
    good = oracle_in(sources, meta)
    text = _CITATION.sub("", answer)  # the markers are not words of the answer
    return {
        "answerable": True,
        "f1": token_f1(text, meta["reference"]),
        "key_span": normalise(meta["key_span"]) in normalise(text),
        "cited": bool(cited),
        "citations": cited,
        "answering_sources": good,
        "retrieved": bool(good),
        "cites_oracle": bool(set(cited) & set(good)) if good else None,
        "correct_citations": len(set(cited) & set(good)) if good else 0,
        "refused": is_refusal(answer),
    }


def score_unanswerable(answer: str) -> dict[str, Any]:
    return {"answerable": False, "refused": is_refusal(answer), "citations": citations(answer)}


def _share(values: Sequence[bool | float]) -> float | None:
    return round(sum(float(v) for v in values) / len(values), 4) if values else None


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The scores (module docstring) over scored rows."""
    answerable = [r for r in rows if r["answerable"]]
    hit = [r for r in answerable if r["retrieved"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    cited_hit = sum(len(r["citations"]) for r in hit)
    return {
        "answerable": len(answerable),
        "unanswerable": len(unanswerable),
        "token_f1": _share([r["f1"] for r in answerable]),
        "key_span": _share([r["key_span"] for r in answerable]),
        "citation_rate": _share([r["cited"] for r in answerable]),
        "cites_oracle": _share([r["cites_oracle"] for r in hit]),
        "citation_precision": (
            round(sum(r["correct_citations"] for r in hit) / cited_hit, 4) if cited_hit else None
        ),
        "retrieval_miss": len(answerable) - len(hit),
        "refusal": _share([r["refused"] for r in unanswerable]),
        "false_refusal": _share([r["refused"] for r in hit]),
    }


def evaluate_split(
    chat: Callable[[dict[str, Any]], dict[str, Any]],
    examples: Sequence[dict[str, Any]],
    *,
    collection: str,
    top_k: int,
    model: str | None,
    max_tokens: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ask every test example (``{"messages", "raft"}`` lines) with ``model`` (None: the
    service's base model); returns the aggregate and the scored rows (with the answers)."""
    rows = []
    for done, ex in enumerate(examples, start=1):
        meta = ex["raft"]
        body: dict[str, Any] = {"temperature": 0, "max_tokens": max_tokens}
        if model is not None:
            body["model"] = model
        if meta["oracle_index"] is not None:
            body["messages"] = [{"role": "user", "content": meta["question"]}]
            body["rag"] = {"collection": collection, "top_k": top_k}
        else:
            body["messages"] = [m for m in ex["messages"] if m["role"] != "assistant"]
            body["rag"] = {"enabled": False}
        response = chat(body)
        answer = response["choices"][0]["message"]["content"] or ""
        if meta["oracle_index"] is not None:
            row = score_answerable(answer, response.get("sources") or [], meta)
        else:
            row = score_unanswerable(answer)
        rows.append({"question": meta["question"], "answer": answer, "chunk": meta["chunk"], **row})
        if progress is not None:
            progress(done, len(examples))
    return aggregate(rows), rows


def beats(adapter: dict[str, Any], base: dict[str, Any], metric: str) -> bool:
    """Whether the adapter is strictly better than base on ``metric``."""
    a, b = adapter.get(metric), base.get(metric)
    if a is None:
        return False
    if b is None:
        return True
    higher = METRICS[metric][1]
    return bool(a > b if higher else a < b)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if value <= 1 else f"{value:.3f}"
    return str(value)


def format_table(reports: dict[str, dict[str, Any]]) -> str:
    """Base and adapter side by side, as plain text (rich's table on a terminal)."""
    names = list(reports)
    rows = [
        (label, [_cell(reports[n].get(key)) for n in names]) for key, (label, _) in METRICS.items()
    ]
    rows.insert(
        0,
        (
            "questions (answerable / not)",
            [f"{reports[n]['answerable']} / {reports[n]['unanswerable']}" for n in names],
        ),
    )
    rows.append(("retrieval missed the chunk", [str(reports[n]["retrieval_miss"]) for n in names]))
    try:
        if not sys.stdout.isatty():
            raise ImportError
        from io import StringIO

        from rich.console import Console
        from rich.table import Table
    except ImportError:
        width = max(len(label) for label, _ in rows) + 2
        lines = [f"{'':<{width}}" + "".join(f"{n:>16}" for n in names)]
        lines += [f"{label:<{width}}" + "".join(f"{c:>16}" for c in cells) for label, cells in rows]
        return "\n".join(lines)
    table = Table(title="held-out questions, real chat path")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    for label, cells in rows:
        table.add_row(label, *cells)
    buffer = StringIO()
    Console(file=buffer, force_terminal=True, width=100).print(table)
    return buffer.getvalue().rstrip()
