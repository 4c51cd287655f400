"""Command line: ``rag-service serve | ingest | search | eval``.

``serve`` takes every setting as a flag (and from its ``RAG_*`` variable); ``--workers N``
runs N processes on one port (postgres engine only). ``ingest`` and ``search`` talk to a
running service over HTTP, and so does ``eval``: it scores retrieval on a JSONL file of
labelled questions and exits non-zero when recall@1 is below ``--min-recall-at-1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "worker_app"]

DEFAULT_URL = "http://127.0.0.1:8000"


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    from rag_service.settings import ENV_PREFIX, Settings, field_type

    for f in dataclasses.fields(Settings):
        typ, choices = field_type(f)
        default = "bundled all-MiniLM-L6-v2" if f.name == "embedding_model" else f.default
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            choices=choices or None,
            metavar=None if choices else typ.__name__.upper(),
            help=f"{f.metadata['help']} [env {ENV_PREFIX}{f.name.upper()}; default {default}]",
        )


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("RAG_URL", DEFAULT_URL),
        help=f"service URL [env RAG_URL; default {DEFAULT_URL}]",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("RAG_API_KEY"),
        help="bearer key for the service [env RAG_API_KEY]",
    )
    parser.add_argument(
        "--collection", "-c", default="default", help="collection name [default: default]"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag-service", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    _settings_flags(serve)
    ingest = sub.add_parser("ingest", help="upsert files or folders into a collection")
    ingest.add_argument("paths", nargs="+", type=Path, help="files or folders (recursive)")
    _client_flags(ingest)
    ingest.add_argument("--batch-size", type=int, default=32, help="documents per request")
    ingest.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    search = sub.add_parser("search", help="search a collection")
    search.add_argument("query")
    _client_flags(search)
    search.add_argument("--top-k", "-k", type=int, default=5)
    search.add_argument("--mode", choices=("dense", "hybrid"), default="dense")
    search.add_argument("--json", action="store_true", help="print the raw JSON answer")
    evaluate = sub.add_parser(
        "eval",
        help="score retrieval on labelled questions",
        description=(
            'FILE holds one JSON object a line: {"question", "document_id"}, '
            '{"question", "document_ids"} or {"question", "answer"} (the answer text is matched '
            "to the one document that holds it). Prints recall@1/5/10, MRR@10, nDCG@10 and the "
            "median latency per search mode."
        ),
    )
    evaluate.add_argument("file", type=Path, help="JSONL file of questions")
    _client_flags(evaluate)
    evaluate.add_argument(
        "--modes", default="dense,hybrid", help="comma-separated search modes [default: both]"
    )
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON")
    evaluate.add_argument(
        "--min-recall-at-1",
        type=float,
        default=None,
        metavar="X",
        help="exit 1 when recall@1 of any mode is below X (a CI gate)",
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rag_service.http_protocol import CoalescingHttpToolsProtocol
    from rag_service.logs import start_logging
    from rag_service.settings import ENV_PREFIX, Settings, SettingsError, parse_value

    overrides: dict[str, Any] = {}
    flags: dict[str, str] = {}
    try:
        for f in dataclasses.fields(Settings):
            raw = getattr(args, f.name)
            if raw is not None:
                overrides[f.name] = parse_value(f, raw)
                flags[ENV_PREFIX + f.name.upper()] = raw
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        print(f"rag-service: {exc}", file=sys.stderr)
        return 2
    listener = start_logging(settings.log_level)
    # log_config=None: uvicorn's loggers (the access log included) propagate to ours.
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "log_config": None,
        "timeout_graceful_shutdown": 10,
        "http": CoalescingHttpToolsProtocol,
    }
    try:
        if settings.workers == 1:
            from rag_service.app import create_app

            uvicorn.run(create_app(settings), **options)
        else:
            # Each worker is a fresh (spawned) process that builds its app with worker_app,
            # from the environment: the flags given here travel there as their RAG_* variables.
            os.environ.update(flags)
            uvicorn.run(
                "rag_service.cli:worker_app", factory=True, workers=settings.workers, **options
            )
    finally:
        listener.stop()
    return 0


def worker_app() -> Any:
    """The app of one ``serve --workers N`` process: settings from the environment, logging
    of its own (a spawned process inherits no handlers)."""
    import atexit

    from rag_service.app import create_app
    from rag_service.logs import start_logging
    from rag_service.settings import Settings

    settings = Settings.from_env()
    atexit.register(start_logging(settings.log_level).stop)
    return create_app(settings)


def _client(args: argparse.Namespace) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=600.0)


def _error_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _post(args: argparse.Namespace, path: str, body: Any, what: str) -> Any:
    """The service's JSON answer to one POST, or None once the failure is printed."""
    import httpx

    try:
        with _client(args) as client:
            resp = client.post(path, json=body)
    except httpx.HTTPError as exc:
        print(f"rag-service: cannot reach {args.url}: {exc}", file=sys.stderr)
        return None
    if resp.status_code != 200:
        print(
            f"rag-service: {what} failed ({resp.status_code}): {_error_message(resp)}",
            file=sys.stderr,
        )
        return None
    return resp.json()


def _ingest(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    from rag_service.loaders import LoadError, discover, load

    try:
        files = list(discover(args.paths))
    except LoadError as exc:
        print(f"rag-service: {exc}", file=sys.stderr)
        return 2
    counts = {"created": 0, "updated": 0, "unchanged": 0}
    failures = 0
    batch: list[dict[str, Any]] = []
    with (
        _client(args) as client,
        tqdm(total=len(files), unit="file", disable=args.no_progress) as bar,
    ):

        def flush() -> bool:
            if not batch:
                return True
            resp = client.post(
                f"/v1/collections/{args.collection}/documents", json={"documents": batch}
            )
            batch.clear()
            if resp.status_code != 200:
                tqdm.write(
                    f"rag-service: upsert failed ({resp.status_code}): {_error_message(resp)}",
                    file=sys.stderr,
                )
                return False
            for doc in resp.json()["documents"]:
                counts[doc["status"]] += 1
            bar.set_postfix(counts)
            return True

        try:
            for path, doc_id in files:
                try:
                    docs = load(path, doc_id)
                except LoadError as exc:
                    tqdm.write(f"rag-service: skipped {exc}", file=sys.stderr)
                    failures += 1
                    docs = []
                for doc in docs:
                    batch.append({"id": doc.id, "text": doc.text, "metadata": doc.metadata})
                    if len(batch) >= args.batch_size and not flush():
                        return 1
                bar.update(1)
            if not flush():
                return 1
        except httpx.HTTPError as exc:
            print(f"rag-service: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 1
    print(
        f"{len(files)} files: {counts['created']} created, {counts['updated']} updated, "
        f"{counts['unchanged']} unchanged" + (f", {failures} skipped" if failures else "")
    )
    return 1 if failures else 0


def _search(args: argparse.Namespace) -> int:
    body = {"query": args.query, "top_k": args.top_k, "mode": args.mode}
    data = _post(args, f"/v1/collections/{args.collection}/search", body, "search")
    if data is None:
        return 1
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    for rank, hit in enumerate(data["results"], start=1):
        snippet = " ".join(hit["text"].split())[:200]
        print(f"{rank}. [{hit['score']:.3f}] {hit['document_id']}#{hit['position']}\n   {snippet}")
    if not data["results"]:
        print("no results")
    return 0


_EVAL_TARGETS = ("document_id", "document_ids", "answer")
_EVAL_MODES = ("dense", "hybrid")


def _eval_row(value: Any) -> tuple[dict[str, Any] | None, str]:
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


def _read_eval_file(path: Path) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """Rows, the line number of each, and one message per bad line."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    errors: list[str] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [], [f"{path}: cannot read: {exc}"]
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            errors.append(f"{path}:{number}: not JSON")
            continue
        row, why = _eval_row(value)
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


def _eval(args: argparse.Namespace) -> int:
    from rag_service.controllers.evaluation import MAX_ROWS

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in _EVAL_MODES for m in modes):
        print(f"rag-service: --modes takes {', '.join(_EVAL_MODES)}", file=sys.stderr)
        return 2
    rows, lines, errors = _read_eval_file(args.file)
    if len(rows) > MAX_ROWS:
        errors.append(f"{args.file}: {len(rows)} questions; at most {MAX_ROWS} per run")
    if errors:
        for message in errors:
            print(f"rag-service: {message}", file=sys.stderr)
        return 2
    body = {"rows": rows, "modes": list(dict.fromkeys(modes))}
    data = _post(args, f"/v1/collections/{args.collection}/evaluate", body, "eval")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"serve": _serve, "ingest": _ingest, "search": _search, "eval": _eval}[args.command]
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
