"""``rag-service questions add FILE``: attach known questions to documents from a file.

FILE holds one JSON object a line, of either kind (they may be mixed):

* a Q/A row, as ``rag-service eval`` reads it (so evaluation pairs serve as they are):
  ``{"question", "document_id"}``, ``{"question", "document_ids"}`` (the question goes to each)
  or ``{"question", "answer"}`` (the answer text is matched to the one document that holds it);
* a chat, as the trainers read it: ``{"messages": [{"role", "content"}, ...]}``. Each user turn
  followed by an assistant turn becomes ``{"question": user turn, "answer": assistant turn}``;
  the answer must be found in a document (as above). User turns longer than a question may
  be (1000 characters) are skipped and counted.

Rows are sent to ``POST /v1/collections/{name}/questions`` in batches, each batch one
transaction. A bad line in the file stops everything before anything is sent (exit 2); a
refused batch stops at that batch (exit 1), naming the line the service pointed at.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path
from typing import Any

from rag_service.cli.client import client, client_flags, error_message
from rag_service.cli.evaluate import eval_row
from rag_service.jsonl import json_lines

__all__ = ["add_questions_parser", "questions_command"]

_ROW = re.compile(r"^questions\[(\d+)\]")


def add_questions_parser(sub: Any) -> None:
    """The ``questions`` subcommand (``questions add FILE``) on the CLI's subparsers."""
    questions = sub.add_parser("questions", help="known questions of documents")
    actions = questions.add_subparsers(dest="action", required=True)
    add = actions.add_parser(
        "add",
        help="attach questions from a Q/A or chat JSONL file",
        description=__doc__.split("\n\n", 1)[1].split("\n\nRows", 1)[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("file", type=Path, help="JSONL file of Q/A rows or chats")
    client_flags(add)
    add.add_argument("--batch-size", type=int, default=1000, help="rows per request")


def _chat_rows(value: dict[str, Any], max_chars: int) -> tuple[list[dict[str, str]], int, str]:
    """Rows of one chat line, how many user turns were too long, and why it is refused."""
    messages = value.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        return [], 0, '"messages" must be a list of {"role", "content"} objects with text content'
    rows: list[dict[str, str]] = []
    too_long = 0
    for turn, reply in itertools.pairwise(messages):
        if turn["role"] != "user" or reply["role"] != "assistant":
            continue
        question, answer = turn["content"].strip(), reply["content"].strip()
        if not question or not answer:
            continue
        if len(question) > max_chars:
            too_long += 1
            continue
        rows.append({"question": question, "answer": answer})
    return rows, too_long, ""


def read_questions_file(path: Path) -> tuple[list[dict[str, str]], list[int], list[str], int]:
    """Rows to send, the line of each, one message per bad line, and skipped long turns."""
    from rag_service.schemas import MAX_QUESTION_CHARS

    rows: list[dict[str, str]] = []
    lines: list[int] = []
    errors: list[str] = []
    skipped = 0
    try:
        values = list(json_lines(path))
    except (OSError, UnicodeDecodeError) as exc:
        return [], [], [f"{path}: cannot read: {exc}"], 0
    for number, value, bad in values:
        if bad is not None:
            errors.append(f"{path}:{number}: {bad}")
            continue
        if isinstance(value, dict) and "messages" in value:
            got, too_long, why = _chat_rows(value, MAX_QUESTION_CHARS)
            skipped += too_long
        else:
            row, why = eval_row(value)
            got = []
            if row is not None:
                if len(row["question"]) > MAX_QUESTION_CHARS:
                    why = f'"question" is longer than {MAX_QUESTION_CHARS} characters'
                elif "document_ids" in row:
                    got = [
                        {"question": row["question"], "document_id": d}
                        for d in dict.fromkeys(row["document_ids"])
                    ]
                else:
                    got = [row]
        if why:
            errors.append(f"{path}:{number}: {why}")
            continue
        rows.extend(got)
        lines.extend([number] * len(got))
    if not rows and not errors:
        errors.append(f"{path}: no questions")
    return rows, lines, errors, skipped


def questions_command(args: argparse.Namespace) -> int:
    import httpx

    rows, lines, errors, skipped = read_questions_file(args.file)
    if args.batch_size < 1:
        errors.append("--batch-size must be at least 1")
    if errors:
        for message in errors:
            print(f"rag-service: {message}", file=sys.stderr)
        return 2
    added, unmatched = 0, 0
    documents: set[str] = set()
    try:
        with client(args) as http:
            for start in range(0, len(rows), args.batch_size):
                batch = rows[start : start + args.batch_size]
                resp = http.post(
                    f"/v1/collections/{args.collection}/questions", json={"questions": batch}
                )
                if resp.status_code != 200:
                    where = ""
                    try:
                        found = _ROW.match(str(resp.json()["error"]["param"] or ""))
                    except (ValueError, KeyError, TypeError):
                        found = None
                    if found is not None and start + int(found[1]) < len(lines):
                        where = f" at {args.file}:{lines[start + int(found[1])]}"
                    print(
                        f"rag-service: questions add failed ({resp.status_code}){where}: "
                        f"{error_message(resp)}",
                        file=sys.stderr,
                    )
                    return 1
                data = resp.json()
                added += data["added"]
                documents.update(d["id"] for d in data["documents"] if d["added"])
                for entry in data["unmatched"]:
                    unmatched += 1
                    named = f": {', '.join(entry['documents'])}" if entry["documents"] else ""
                    reason = (
                        "the answer is in several documents"
                        if entry["reason"] == "ambiguous"
                        else "the answer is in no document"
                    )
                    line = lines[start + entry["row"]]
                    print(f"{args.file}:{line}: left out, {reason}{named}", file=sys.stderr)
    except httpx.HTTPError as exc:
        print(f"rag-service: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(
        f"{len(rows)} questions: {added} added to {len(documents)} documents, "
        f"{len(rows) - added - unmatched} already there, {unmatched} unmatched"
        + (f"; {skipped} user turns too long to be questions" if skipped else "")
    )
    return 0
