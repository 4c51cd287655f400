"""Command line: ``rag-service serve | ingest | search | eval | questions | reindex |
check-ids``.

``serve`` takes every setting as a flag (and from its ``RAG_*`` variable); ``--workers N``
runs N processes on one port (postgres engine only). ``search`` (here) and ``ingest``,
``eval``, ``questions``, ``reindex`` and ``check-ids`` (their own modules) talk to a running
service over HTTP.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from rag_service.cli.check_ids import add_check_ids_parser, check_ids_command
from rag_service.cli.client import client_flags, post
from rag_service.cli.evaluate import add_eval_parser, eval_command
from rag_service.cli.ingest import add_ingest_parser, ingest_command
from rag_service.cli.questions import add_questions_parser, questions_command
from rag_service.cli.reindex import add_reindex_parser, reindex_command

__all__ = ["main", "worker_app"]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rag-service",
        description="Run the RAG service (serve), or talk to a running one (ingest, search, "
        "eval, questions, reindex, check-ids).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    _settings_flags(serve)
    add_ingest_parser(sub)
    search = sub.add_parser("search", help="search a collection")
    search.add_argument("query")
    client_flags(search)
    search.add_argument("--top-k", "-k", type=int, default=5)
    search.add_argument(
        "--mode",
        choices=("dense", "hybrid"),
        default=None,
        help="retrieval mode (default: the collection's search defaults, else dense)",
    )
    search.add_argument(
        "--rerank", action="store_true", help="rerank with the service's cross-encoder"
    )
    search.add_argument("--json", action="store_true", help="print the raw JSON answer")
    add_eval_parser(sub)
    add_questions_parser(sub)
    add_reindex_parser(sub)
    add_check_ids_parser(sub)
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
    # uvicorn binds only after the app's startup, which begins loading the models: a port in
    # use would show up after that work began, and its logs would run on past the exit.
    busy = _port_taken(settings.host, settings.port)
    if busy is not None:
        print(
            f"rag-service: cannot listen on {settings.host}:{settings.port}: {busy}",
            file=sys.stderr,
        )
        return 1
    listener = start_logging(settings.log_level)
    # log_config=None: uvicorn's loggers (the access log included) propagate to ours.
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "log_config": None,
        "timeout_graceful_shutdown": 10,
        "http": CoalescingHttpToolsProtocol,
        # The bound on a request line and headers; CoalescingHttpToolsProtocol reads it too.
        "h11_max_incomplete_event_size": settings.max_header_bytes,
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
                "rag_service.cli.main:worker_app", factory=True, workers=settings.workers, **options
            )
    finally:
        listener.stop()
    return 0


def _port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (bound the way uvicorn binds), or None."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return str(exc)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


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


def _search(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"query": args.query, "top_k": args.top_k}
    if args.mode is not None:  # else the collection's search defaults apply
        body["mode"] = args.mode
    if args.rerank:
        body["rerank"] = True
    data = post(args, f"/v1/collections/{args.collection}/search", body, "search")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "serve": _serve,
        "ingest": ingest_command,
        "search": _search,
        "eval": eval_command,
        "questions": questions_command,
        "reindex": reindex_command,
        "check-ids": check_ids_command,
    }[args.command]
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
