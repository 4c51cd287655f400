"""``rag-service check-ids [--collection NAME]``: stored ids that break the id rule.

Ids are held to one rule (:mod:`rag_service.ids`) since documents with ``.`` or ``..``
segments could be read, replaced or deleted through another document's URL, and ids with
empty segments, a leading or trailing ``/`` or control characters could not be addressed at
all. Documents stored before the rule keep their ids: nothing renames them behind the
user's back. This command lists them, one line per document (collection, the id as a
Python string literal, why), over every collection or the one ``--collection`` names, and
changes nothing; the exit status is 1 when it found any, 0 when none.

To move such a document, read it and delete it with the dots of its path percent-encoded
(``%2E``: clients leave those alone, the service decodes them), and upsert its text under a
valid id.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from rag_service.cli.client import client, client_flags, error_message
from rag_service.ids import id_problem

__all__ = ["add_check_ids_parser", "check_ids_command"]

PAGE = 1000


def add_check_ids_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "check-ids",
        help="list stored document ids that break the id rule (changes nothing)",
    )
    client_flags(parser)
    parser.set_defaults(collection=None)  # every collection unless --collection names one


def _pages(http: Any, path: str) -> Iterator[dict[str, Any]]:
    after = ""
    while True:
        params: dict[str, Any] = {"limit": PAGE, **({"after": after} if after else {})}
        resp = http.get(path, params=params)
        if resp.status_code != 200:
            raise RuntimeError(f"GET {path} failed ({resp.status_code}): {error_message(resp)}")
        page = resp.json()
        yield from page["data"]
        if not page.get("has_more"):
            return
        after = page["last_id"]


def check_ids_command(args: argparse.Namespace) -> int:
    import httpx

    found = 0
    try:
        with client(args) as http:
            if args.collection is not None:
                names = [args.collection]
            else:
                resp = http.get("/v1/collections")
                if resp.status_code != 200:
                    raise RuntimeError(
                        f"listing collections failed ({resp.status_code}): {error_message(resp)}"
                    )
                names = [c["name"] for c in resp.json()["data"]]
            for name in names:
                for doc in _pages(http, f"/v1/collections/{name}/documents"):
                    problem = id_problem(doc["id"])
                    if problem is not None:
                        found += 1
                        print(f"{name}\t{doc['id']!r}\t{problem}")
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"rag-service: {exc}", file=sys.stderr)
        return 2
    print(
        f"{found} document ids break the id rule"
        if found
        else "every document id follows the rule",
        file=sys.stderr,
    )
    return 1 if found else 0
