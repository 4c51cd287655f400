"""What every client subcommand shares: where the service is, its key, one HTTP client.

The service URL is ``--url``, else ``RAG_URL``, else ``http://RAG_HOST:RAG_PORT`` (the
address ``rag-service serve`` listens on, with 127.0.0.1 for a wildcard host), so a shell that
set ``RAG_PORT=9000`` for the server reaches it with no flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["client", "client_flags", "default_url", "error_message", "post"]


def default_url(env: Mapping[str, str] | None = None) -> str:
    """``RAG_URL``, else the URL of ``RAG_HOST``:``RAG_PORT`` (defaults 127.0.0.1:8000)."""
    env = os.environ if env is None else env
    if env.get("RAG_URL"):
        return env["RAG_URL"]
    host = env.get("RAG_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{env.get('RAG_PORT') or 8000}"


def client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=default_url(),
        help="service URL [env RAG_URL, else http://RAG_HOST:RAG_PORT; now %(default)s]",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("RAG_API_KEY"),
        help="bearer key for the service [env RAG_API_KEY]",
    )
    parser.add_argument(
        "--collection", "-c", default="default", help="collection name [default: default]"
    )


def client(args: argparse.Namespace) -> Any:
    import httpx  # imported on use: --help stays fast

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=600.0)


def error_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def post(args: argparse.Namespace, path: str, body: Any, what: str) -> Any:
    """The service's JSON answer to one POST, or None once the failure is printed."""
    import httpx

    try:
        with client(args) as http:
            resp = http.post(path, json=body)
    except httpx.HTTPError as exc:
        print(f"rag-service: cannot reach {args.url}: {exc}", file=sys.stderr)
        return None
    if resp.status_code != 200:
        print(
            f"rag-service: {what} failed ({resp.status_code}): {error_message(resp)}",
            file=sys.stderr,
        )
        return None
    return resp.json()
