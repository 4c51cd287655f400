"""``rag-service ingest PATH... [--sync] [--dry-run]``: files and folders into a collection.

Files are read here, by the loaders the service's upload endpoint uses
(:mod:`rag_service.loaders`: PDF, Word, HTML, Markdown, reST, text, JSONL), and sent as
documents (text plus metadata, the page and section layout included) in batches of at most
``--batch-size`` documents or :data:`BATCH_CHARS` characters, so progress moves every few
seconds of embedding. A file that cannot be read is reported and skipped; the others go on.

Ids come from paths: ``<folder name>/<path inside it>`` for the files of a folder, the file's
name for a file given alone. ``--sync`` then deletes the documents under each folder's id
prefix whose files are gone (a file that is still there but failed to load keeps its
document). ``--dry-run`` changes nothing and lists what a run would create, update and
delete, comparing content hashes and metadata with what the service holds.

The progress bar counts files the service has acknowledged, with the chunks made so far; when
standard error is not a terminal it prints plain lines instead. A failure stops the run, says
how far it got and exits 1; files that were skipped make the exit status 1 as well.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rag_service.cli.client import client, client_flags, error_message
from rag_service.loader_workers import LoaderPool
from rag_service.settings import Settings, SettingsError

__all__ = ["BATCH_CHARS", "add_ingest_parser", "ingest_command"]

# A batch is sent once it holds this many characters, whatever --batch-size says, so the
# progress moves every few seconds of embedding (about 1000 chunks of text on one CPU core's
# minute) instead of jumping from 0 to 100% on one large request.
BATCH_CHARS = 100_000
PAGE = 1000  # documents per page when listing what the service holds


def add_ingest_parser(sub: Any) -> None:
    ingest = sub.add_parser(
        "ingest",
        help="upsert files or folders into a collection (PDF, Word, HTML, Markdown, reST, "
        "text, JSONL)",
    )
    ingest.add_argument("paths", nargs="+", type=Path, help="files or folders (recursive)")
    client_flags(ingest)
    ingest.add_argument("--batch-size", type=int, default=32, help="documents per request")
    ingest.add_argument(
        "--sync",
        action="store_true",
        help="also delete the documents of each folder whose files are gone",
    )
    ingest.add_argument(
        "--dry-run",
        action="store_true",
        help="change nothing: list what would be created, updated and deleted",
    )
    ingest.add_argument("--no-progress", action="store_true", help="hide the progress output")


class ServiceError(Exception):
    """The service answered with an error, or could not be reached; the message says which."""


@dataclass
class Plan:
    """What the files held as they were read: the ids made, and the files that failed."""

    files: list[tuple[Path, str]]
    loaders: LoaderPool
    ids: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)  # doc ids of files that did not load
    skipped: int = 0

    def prefixes(self, paths: list[Path]) -> list[str]:
        return [f"{p.resolve().name}/" for p in paths if p.is_dir()]

    def keeps(self, doc_id: str) -> bool:
        """Whether ``--sync`` keeps a stored document: made from a file now, or belonging to
        a file that is there but failed to load."""
        return doc_id in self.ids or any(
            doc_id == f or doc_id.startswith(f + "#") for f in self.failed
        )

    def documents(self, warn: Any) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """``(file index, document)`` file by file (one file in memory at a time), and
        ``(file index, None)`` once a file is read through. Files are parsed in loader
        processes, as uploads are (:mod:`rag_service.loader_workers`)."""
        from rag_service.loaders import LoadError, read_file

        for index, (path, doc_id) in enumerate(self.files):
            try:
                docs = self.loaders.load_sync(read_file(path), path.name, doc_id)
            except LoadError as exc:
                where = f"{path}{exc.filename[len(path.name) :]}"  # the path, and a JSONL line
                warn(f"rag-service: skipped {where}: {exc.reason}")
                self.skipped += 1
                self.failed.append(doc_id)
                docs = []
            for doc in docs:
                self.ids.add(doc.id)
                yield index, {"id": doc.id, "text": doc.text, "metadata": doc.metadata}
            yield index, None


def _stored(http: Any, collection: str, prefix: str) -> Iterator[dict[str, Any]]:
    """The documents the service holds under ``prefix`` (none when the collection does not
    exist), page by page."""
    after = ""
    while True:
        params = {"limit": PAGE, "prefix": prefix, **({"after": after} if after else {})}
        resp = http.get(f"/v1/collections/{collection}/documents", params=params)
        if resp.status_code == 404:
            return
        if resp.status_code != 200:
            raise ServiceError(
                f"listing documents failed ({resp.status_code}): {error_message(resp)}"
            )
        page = resp.json()
        yield from page["data"]
        if not page["has_more"]:
            return
        after = page["last_id"]


def _vanished(http: Any, args: argparse.Namespace, plan: Plan) -> list[str]:
    return [
        doc["id"]
        for prefix in plan.prefixes(args.paths)
        for doc in _stored(http, args.collection, prefix)
        if not plan.keeps(doc["id"])
    ]


def _doc_path(collection: str, doc_id: str) -> str:
    return f"/v1/collections/{collection}/documents/{quote(doc_id, safe='/')}"


def _dry_run(http: Any, args: argparse.Namespace, plan: Plan) -> int:
    from indexes.types import content_hash

    held: dict[str, dict[str, Any]] = {}
    for prefix in plan.prefixes(args.paths):
        held.update({d["id"]: d for d in _stored(http, args.collection, prefix)})
    counts = {"create": 0, "update": 0, "unchanged": 0, "delete": 0}
    for _, doc in plan.documents(lambda line: print(line, file=sys.stderr)):
        if doc is None:
            continue
        old = held.get(doc["id"])
        if old is None:
            resp = http.get(_doc_path(args.collection, doc["id"]))
            if resp.status_code == 200:
                old = resp.json()
            elif resp.status_code != 404:
                raise ServiceError(
                    f"reading {doc['id']} failed ({resp.status_code}): {error_message(resp)}"
                )
        if old is None:
            action = "create"
        elif (
            old.get("content_hash") != content_hash(doc["text"])
            or old["metadata"] != doc["metadata"]
        ):
            action = "update"
        else:
            action = "unchanged"
        counts[action] += 1
        if action != "unchanged":
            print(f"{action:<7} {doc['id']}")
    if args.sync:
        for doc_id in _vanished(http, args, plan):
            counts["delete"] += 1
            print(f"delete  {doc_id}")
    print(
        f"dry run, nothing changed: {counts['create']} to create, {counts['update']} to update, "
        f"{counts['unchanged']} unchanged"
        + (f", {counts['delete']} to delete" if args.sync else "")
        + (f", {plan.skipped} files skipped" if plan.skipped else "")
    )
    return 1 if plan.skipped else 0


class Progress:
    """A tqdm bar over files (chunks in its postfix) on a terminal; plain lines otherwise."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        from tqdm import tqdm

        self.total = total
        self.done = 0
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="file", disable=not (enabled and self.tty))

    def advance(self, files: int, counts: dict[str, int]) -> None:
        self.done += files
        self.bar.update(files)
        self.bar.set_postfix(counts)
        if self.enabled and not self.tty:
            print(
                f"stored {self.done}/{self.total} files, {counts['chunks']} chunks",
                file=sys.stderr,
                flush=True,
            )

    def write(self, line: str) -> None:
        from tqdm import tqdm

        if self.bar.disable:
            print(line, file=sys.stderr)
        else:
            tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _upsert(
    http: Any, args: argparse.Namespace, plan: Plan, progress: Progress, counts: dict[str, int]
) -> None:
    batch: list[dict[str, Any]] = []
    chars = 0
    read = 0  # files read through: their documents are in a batch, or stored
    acknowledged = 0  # files whose documents are all stored

    def flush() -> None:
        nonlocal chars, acknowledged
        if batch:
            resp = http.post(
                f"/v1/collections/{args.collection}/documents", json={"documents": batch}
            )
            if resp.status_code != 200:
                raise ServiceError(f"upsert failed ({resp.status_code}): {error_message(resp)}")
            for doc in resp.json()["documents"]:
                counts[doc["status"]] += 1
                counts["chunks"] += doc["chunks"]
        batch.clear()
        chars = 0
        progress.advance(read - acknowledged, counts)
        acknowledged = read

    for index, doc in plan.documents(progress.write):
        if doc is None:
            read = index + 1
            continue
        batch.append(doc)
        chars += len(doc["text"])
        if len(batch) >= args.batch_size or chars >= BATCH_CHARS:
            flush()
    flush()


def ingest_command(args: argparse.Namespace) -> int:
    from rag_service.loaders import LoadError, discover

    try:
        files = list(discover(args.paths))
    except LoadError as exc:
        print(f"rag-service: {exc}", file=sys.stderr)
        return 2
    if args.sync and not any(p.is_dir() for p in args.paths):
        print("rag-service: --sync applies to folders; none was given", file=sys.stderr)
        return 2
    counts = {"created": 0, "updated": 0, "unchanged": 0, "chunks": 0}
    progress = Progress(len(files), enabled=not args.no_progress and not args.dry_run)
    try:
        loaders = LoaderPool.from_settings(Settings.from_env())
    except SettingsError as exc:
        print(f"rag-service: {exc}", file=sys.stderr)
        return 2
    try:
        return _ingest(args, Plan(files, loaders), progress, counts)
    finally:
        loaders.close()


def _ingest(
    args: argparse.Namespace, plan: Plan, progress: Progress, counts: dict[str, int]
) -> int:
    import httpx

    files = plan.files
    deleted = 0
    try:
        with client(args) as http:
            if args.dry_run:
                progress.close()
                return _dry_run(http, args, plan)
            _upsert(http, args, plan, progress, counts)
            if args.sync:
                for doc_id in _vanished(http, args, plan):
                    resp = http.delete(_doc_path(args.collection, doc_id))
                    if resp.status_code not in (204, 404):
                        raise ServiceError(
                            f"deleting {doc_id} failed ({resp.status_code}): {error_message(resp)}"
                        )
                    deleted += 1
    except (ServiceError, httpx.HTTPError) as exc:
        progress.close()
        reason = str(exc) if isinstance(exc, ServiceError) else f"cannot reach {args.url}: {exc}"
        print(f"rag-service: {reason}", file=sys.stderr)
        print(
            f"rag-service: stopped after {progress.done} of {len(files)} files: "
            f"{counts['created']} created, {counts['updated']} updated, "
            f"{counts['unchanged']} unchanged" + (f", {deleted} deleted" if deleted else ""),
            file=sys.stderr,
        )
        return 1
    progress.close()
    print(
        f"{len(files)} files: {counts['created']} created, {counts['updated']} updated, "
        f"{counts['unchanged']} unchanged, {counts['chunks']} chunks"
        + (f", {deleted} deleted" if args.sync else "")
        + (f", {plan.skipped} skipped" if plan.skipped else "")
    )
    return 1 if plan.skipped else 0
