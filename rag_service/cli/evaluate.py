"""``rag-service eval FILE``: score retrieval on labelled questions through a running service.

FILE holds one JSON object a line: ``{"question", "document_id"}``, ``{"question",
"document_ids"}`` or ``{"question", "answer"}`` (the answer text is matched to the one document
that holds it). The service's evaluate endpoint runs the searches; this prints its table (or
JSON) and exits 1 when recall@1 of any mode is below ``--min-recall-at-1``, a CI gate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rag_service.cli.client import client_flags, post
from rag_service.jsonl import json_lines

__all__ = ["add_eval_parser", "eval_command", "eval_row", "read_eval_file"]


def add_eval_parser(sub: Any) -> None:
    """The ``eval`` subcommand on the CLI's subparsers."""
    evaluate = sub.add_parser(
        "eval",
        help="score retrieval on labelled questions",
        description=(
            'FILE holds one JSON object a line: {"question", "document_id"}, '
            '{"question", "document_ids"} or {"question", "answer"} (the answer text is matched '
            "to the one document that holds it). Prints recall@1/5/10, MRR@10, nDCG@10 and the "
            "median latency per search mode (rerank: the collection's retrieval mode, then "
            "the service's cross-encoder)."
        ),
    )
    evaluate.add_argument("file", type=Path, help="JSONL file of questions")
    client_flags(evaluate)
    evaluate.add_argument(
        "--modes",
        default=None,
        help="comma-separated search modes: dense, hybrid, rerank [default: dense and hybrid, "
        "plus rerank when the service has a reranker]",
    )
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON")
    evaluate.add_argument(
        "--min-recall-at-1",
        type=float,
        default=None,
        metavar="X",
        help="exit 1 when recall@1 of any mode is below X (a CI gate)",
    )


_EVAL_TARGETS = ("document_id", "document_ids", "answer")
_EVAL_MODES = ("dense", "hybrid", "rerank")


def eval_row(value: Any) -> tuple[dict[str, Any] | None, str]:
    """The request row of one parsed JSONL line, or None and why it is refused."""
    if not isinstance(value, dict):
        return None, "not a JSON object"
    question = value.get("question")
    if not isinstance(question, str) or not question.strip():
        return None, '"question" must be a non-blank string'
    given = [k for k in _EVAL_TARGETS if value.get(k) is not None]
    if len(given) != 1:
        return None, 'give exactly one of "document_id", "document_ids" or "answer"'
    target = value[given[0]]
    if given[0] == "document_ids":
        ok = bool(target) and isinstance(target, list) and all(isinstance(d, str) for d in target)
        if not ok:
            return None, '"document_ids" must be a non-empty list of strings'
    elif not isinstance(target, str) or not target.strip():
        return None, f'"{given[0]}" must be a non-blank string'
    return {"question": question, given[0]: target}, ""


def read_eval_file(path: Path) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """Rows, the line number of each, and one message per bad line."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    errors: list[str] = []
    try:
        values = list(json_lines(path))
    except (OSError, UnicodeDecodeError) as exc:
        return [], [], [f"{path}: cannot read: {exc}"]
    for number, value, bad in values:
        if bad is not None:
            errors.append(f"{path}:{number}: {bad}")
            continue
        row, why = eval_row(value)
        if row is None:
            errors.append(f"{path}:{number}: {why}")
            continue
        rows.append(row)
        lines.append(number)
    if not rows and not errors:
        errors.append(f"{path}: no questions")
    return rows, lines, errors


_EVAL_COLUMNS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
_UNMATCHED = {
    "no_match": "the answer is in no document",
    "ambiguous": "the answer is in several documents",
    "unknown_document": "no such document",
}


def eval_command(args: argparse.Namespace) -> int:
    from rag_service.controllers.evaluation import MAX_ROWS

    modes = [m.strip() for m in (args.modes or ",".join(_EVAL_MODES)).split(",") if m.strip()]
    if not modes or any(m not in _EVAL_MODES for m in modes):
        print(f"rag-service: --modes takes {', '.join(_EVAL_MODES)}", file=sys.stderr)
        return 2
    rows, lines, errors = read_eval_file(args.file)
    if len(rows) > MAX_ROWS:
        errors.append(f"{args.file}: {len(rows)} questions; at most {MAX_ROWS} per run")
    if errors:
        for message in errors:
            print(f"rag-service: {message}", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"rows": rows}
    if args.modes is not None:  # left out: the service's default modes
        body["modes"] = list(dict.fromkeys(modes))
    data = post(args, f"/v1/collections/{args.collection}/evaluate", body, "eval")
    if data is None:
        return 1
    for entry in data["unmatched"]:
        entry["line"] = lines[entry["row"]]
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        for entry in data["unmatched"]:
            named = f": {', '.join(entry['documents'])}" if entry["documents"] else ""
            print(
                f"{args.file}:{entry['line']}: left out, {_UNMATCHED[entry['reason']]}{named}",
                file=sys.stderr,
            )
        print(
            f"collection {data['collection']}: {data['evaluated']} of {data['rows']} questions "
            f"evaluated, search depth {data['top_k']}"
        )
        print(f"{'mode':<8}" + "".join(f"{c:>11}" for c in _EVAL_COLUMNS) + f"{'p50 ms':>10}")
        for mode, figures in data["modes"].items():
            cells = "".join(f"{figures[c]:>11.3f}" for c in _EVAL_COLUMNS)
            print(f"{mode:<8}{cells}{figures['latency_p50_ms']:>10.1f}")
    if args.min_recall_at_1 is not None:
        below = {
            mode: figures["recall@1"]
            for mode, figures in data["modes"].items()
            if figures["recall@1"] < args.min_recall_at_1
        }
        if below:
            worst = ", ".join(f"{mode} {value:.3f}" for mode, value in below.items())
            print(f"rag-service: recall@1 below {args.min_recall_at_1}: {worst}", file=sys.stderr)
            return 1
    return 0
