"""``rag-service ingest PATH... [--sync] [--dry-run]``: files and folders into a collection.

Files are read here, by the loaders the service's upload endpoint uses
(:mod:`rag_service.loaders`: PDF, Word, HTML, Markdown, reST, text, JSONL), and sent as
documents (text plus metadata, the page and section layout included) in batches of at most
``--batch-size`` documents or :data:`BATCH_CHARS` characters, so progress moves every few
seconds of embedding. A file that cannot be read is reported and skipped; the others go on.

Ids come from paths: ``<prefix>/<path inside it>`` for the files of a folder (the prefix is
the folder's name unless ``--prefix`` gives one), the file's name for a file given alone; an
id that breaks the id rule (:mod:`rag_service.ids`) skips its file. Each document of a folder
records the folder it came from in its metadata, ``folder``: the folder's absolute path, or
the name ``--source`` gives (say, to move the folder and keep syncing it).

Two folders never share ids unless asked to: when documents under a folder's prefix record
another folder, the run stops before writing anything and says to give ``--prefix`` (other
ids) or ``--source`` (the same source). ``--sync`` then deletes the documents of *this*
folder whose files are gone: under its prefix and recording its source (a file that is still
there but failed to load keeps its document). Documents that record no folder (ingested by
an older version) are never deleted, as nothing says which folder they came from: they are
counted and named in a note, and the next ingest of their folder records it. ``--dry-run``
changes nothing and lists what a run would create, update and delete, comparing content
hashes and metadata with what the service holds.

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
from rag_service.ids import id_problem
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
        "--prefix",
        help="id prefix of a folder's documents (default: the folder's name); gives a folder "
        "its own ids when another folder of the same name is in the collection",
    )
    ingest.add_argument(
        "--source",
        help="the name a folder's documents record as their folder (default: its absolute "
        "path); --sync deletes only documents that record it",
    )
    ingest.add_argument(
        "--dry-run",
        action="store_true",
        help="change nothing: list what would be created, updated and deleted",
    )
    ingest.add_argument("--no-progress", action="store_true", help="hide the progress output")


class ServiceError(Exception):
    """The service answered with an error, or could not be reached; the message says which."""


FOLDER_KEY = "folder"  # the metadata key that records where a document was ingested from


@dataclass(frozen=True)
class Folder:
    """A folder given to ingest: its id prefix (with the final ``/``) and its source."""

    path: Path
    prefix: str
    source: str


@dataclass
class Plan:
    """What the files held as they were read: the ids made, and the files that failed.
    ``files`` are (path, document id, the source of its folder or None)."""

    files: list[tuple[Path, str, str | None]]
    loaders: LoaderPool
    folders: list[Folder] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)  # doc ids of files that did not load
    skipped: int = 0

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

        for index, (path, doc_id, source) in enumerate(self.files):
            problem = id_problem(doc_id)
            try:
                if problem is not None:
                    raise LoadError(
                        path.name, f"{doc_id[:80]!r} cannot be a document id: {problem}"
                    )
                docs = self.loaders.load_sync(read_file(path), path.name, doc_id)
            except LoadError as exc:
                where = f"{path}{exc.filename[len(path.name) :]}"  # the path, and a JSONL line
                warn(f"rag-service: skipped {where}: {exc.reason}")
                self.skipped += 1
                self.failed.append(doc_id)
                docs = []
            for doc in docs:
                self.ids.add(doc.id)
                metadata = doc.metadata if source is None else {**doc.metadata, FOLDER_KEY: source}
                yield index, {"id": doc.id, "text": doc.text, "metadata": metadata}
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


def _claimed_elsewhere(http: Any, args: argparse.Namespace, plan: Plan) -> str | None:
    """Why this run would write over another folder's documents, or None."""
    for folder in plan.folders:
        for doc in _stored(http, args.collection, folder.prefix):
            other = doc["metadata"].get(FOLDER_KEY)
            if other is not None and other != folder.source:
                return (
                    f"documents under {folder.prefix!r} come from the folder {other!r}, not "
                    f"{folder.source!r}: give --prefix NAME to store this folder under other "
                    f"ids, or --source {other!r} if it is that folder, moved"
                )
    return None


def _vanished(http: Any, args: argparse.Namespace, plan: Plan, warn: Any) -> list[str]:
    """The documents of this run's folders whose files are gone. Documents that record no
    folder are never among them (nothing says which folder they came from): ``warn`` is
    told how many were kept."""
    gone: list[str] = []
    for folder in plan.folders:
        unattributed = []
        for doc in _stored(http, args.collection, folder.prefix):
            if plan.keeps(doc["id"]):
                continue
            recorded = doc["metadata"].get(FOLDER_KEY)
            if recorded == folder.source:
                gone.append(doc["id"])
            elif recorded is None:
                unattributed.append(doc["id"])
        if unattributed:
            warn(
                f"rag-service: kept {len(unattributed)} documents under {folder.prefix!r} that "
                f"record no folder (e.g. {unattributed[0]!r}): --sync deletes only documents "
                "it can tell came from this folder; delete them by hand if they did"
            )
    return gone


def _doc_path(collection: str, doc_id: str) -> str:
    return f"/v1/collections/{collection}/documents/{quote(doc_id, safe='/')}"


def _dry_run(http: Any, args: argparse.Namespace, plan: Plan) -> int:
    from indexes.types import content_hash

    held: dict[str, dict[str, Any]] = {}
    for folder in plan.folders:
        held.update({d["id"]: d for d in _stored(http, args.collection, folder.prefix)})
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
        for doc_id in _vanished(http, args, plan, lambda line: print(line, file=sys.stderr)):
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


def _plan_files(
    args: argparse.Namespace,
) -> tuple[list[tuple[Path, str, str | None]], list[Folder]]:
    """Every file to read (with its id and its folder's source) and the folders given."""
    from rag_service.loaders import discover

    files: list[tuple[Path, str, str | None]] = []
    folders: list[Folder] = []
    for root in args.paths:
        if root.is_dir():
            base = root.resolve()
            folder = Folder(base, f"{args.prefix or base.name}/", args.source or str(base))
            folders.append(folder)
            files += [(p, i, folder.source) for p, i in discover([root], args.prefix)]
        else:
            files += [(p, i, None) for p, i in discover([root])]
    return files, folders


def ingest_command(args: argparse.Namespace) -> int:
    from rag_service.loaders import LoadError

    folders_given = sum(p.is_dir() for p in args.paths)
    if (args.prefix is not None or args.source is not None) and folders_given != 1:
        print(
            "rag-service: --prefix and --source name one folder: give exactly one folder",
            file=sys.stderr,
        )
        return 2
    if args.prefix is not None and (not args.prefix or id_problem(f"{args.prefix}/x") is not None):
        print(f"rag-service: --prefix {args.prefix!r} cannot start document ids", file=sys.stderr)
        return 2
    try:
        files, folders = _plan_files(args)
    except LoadError as exc:
        print(f"rag-service: {exc}", file=sys.stderr)
        return 2
    if args.sync and not folders:
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
        return _ingest(args, Plan(files, loaders, folders), progress, counts)
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
            claimed = _claimed_elsewhere(http, args, plan)
            if claimed is not None:
                progress.close()
                print(f"rag-service: {claimed}; nothing was changed", file=sys.stderr)
                return 2
            if args.dry_run:
                progress.close()
                return _dry_run(http, args, plan)
            _upsert(http, args, plan, progress, counts)
            if args.sync:
                for doc_id in _vanished(http, args, plan, progress.write):
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
