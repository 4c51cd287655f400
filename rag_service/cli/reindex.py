"""``rag-service reindex NAME --model DIR [--wait]``: move a collection to another embedding
model through a running service.

DIR is a model directory inside the service's models directory (``RAG_MODELS_DIR``, default
``<data_dir>/models``): its name there, or a path on this machine that lies inside it. The
service re-embeds the collection's stored texts in the background while the old model keeps
serving, then swaps. Without ``--wait`` the command returns once the job has started; with it,
a progress bar follows the job until it is done (exit 0) or failed (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rag_service.cli.client import client, client_flags, error_message

__all__ = ["add_reindex_parser", "reindex_command"]


def add_reindex_parser(sub: Any) -> None:
    """The ``reindex`` subcommand on the CLI's subparsers."""
    reindex = sub.add_parser(
        "reindex",
        help="move a collection to another embedding model",
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reindex.add_argument("name", nargs="?", help="the collection [default: --collection]")
    reindex.add_argument(
        "--model", "-m", required=True, metavar="DIR", help="model directory in RAG_MODELS_DIR"
    )
    client_flags(reindex)
    reindex.add_argument(
        "--force", action="store_true", help="accept a model flagged WORSE_THAN_BASE"
    )
    reindex.add_argument("--wait", action="store_true", help="follow the job until it ends")
    reindex.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    reindex.add_argument(
        "--interval", type=float, default=0.5, metavar="S", help="seconds between polls"
    )


def _model_argument(raw: str) -> str:
    """A path (it holds a separator) that exists here is sent absolute: the service checks
    that it lies inside its models directory. Anything else is sent as given, a name inside
    that directory, even when the working directory happens to hold one of that name."""
    path = Path(raw)
    if any(sep in raw for sep in ("/", os.sep, os.altsep or "/")) and path.exists():
        return str(path.resolve())
    return raw


def reindex_command(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    name = args.name or args.collection
    body = {"embedding_model": _model_argument(args.model), "force": args.force}
    try:
        with client(args) as http:
            resp = http.post(f"/v1/collections/{name}/reindex", json=body)
            if resp.status_code != 202:
                print(
                    f"rag-service: reindex failed ({resp.status_code}): {error_message(resp)}",
                    file=sys.stderr,
                )
                return 1
            job = resp.json()["reindex"]
            print(
                f"reindex of {name} to {job['embedding_model']} (dimension {job['dimension']}) "
                f"started: {job['done']} of {job['total']} vectors"
            )
            if not args.wait:
                return 0
            with tqdm(
                total=job["total"], initial=job["done"], unit="vec", disable=args.no_progress
            ) as bar:
                while job["state"] == "running":
                    time.sleep(args.interval)
                    resp = http.get(f"/v1/collections/{name}/reindex")
                    if resp.status_code != 200:
                        tqdm.write(
                            f"rag-service: reindex status ({resp.status_code}): "
                            f"{error_message(resp)}",
                            file=sys.stderr,
                        )
                        return 1
                    job = resp.json()
                    bar.total = job["total"]
                    bar.n = job["done"]
                    bar.refresh()
    except httpx.HTTPError as exc:
        print(f"rag-service: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if job["state"] == "failed":
        print(f"rag-service: reindex of {name} failed: {job.get('error')}", file=sys.stderr)
        return 1
    print(
        f"collection {name} is embedded with {job['embedding_model']} now ({job['total']} vectors)"
    )
    return 0
