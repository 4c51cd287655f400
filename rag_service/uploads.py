"""Files to documents over HTTP: ``POST /v1/collections/{name}/files``.

The request is ``multipart/form-data``: one or more ``files`` parts, optionally as many ``id``
parts (the document id of each file, in order; by default the file's name) and one
``metadata`` part (a JSON object merged into every file's metadata, over what the file says
of itself: title, page count, content type, source).

Each file is read by the same loaders as ``rag-service ingest`` (:mod:`rag_service.loaders`),
in a loader process (:mod:`rag_service.loader_workers`: killed past its time or memory budget,
or when the client leaves), and checked on its own: a file of a type not supported (415), too
large or past a parsing bound (413), empty (400) or that does not parse (422: corrupt,
encrypted, a PDF without a text layer) is reported by name and nothing of it is written, while
the other files of the upload go on. The files that loaded are stored by one upsert (one
transaction, the same statuses as ``POST .../documents``). When no file could be stored the
answer is the error itself (the first failure's status, every file named in the message).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from litestar.datastructures import UploadFile

from rag_service import bounded_json
from rag_service.errors import (
    EmptyFile,
    FileTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    RagError,
    UnreadableFile,
    UnsupportedFileType,
)
from rag_service.ids import id_problem
from rag_service.knowledge import KnowledgeBase
from rag_service.loader_workers import LoaderPool
from rag_service.loaders import CONTENT_TYPES, LoadError
from rag_service.locations import LAYOUT_KEYS
from rag_service.schemas import DocumentIn, DocumentStatus, FileError, FileOutcome
from rag_service.settings import Settings

__all__ = ["FileUpload", "load_files", "read_upload", "store_files"]

_LOAD_ERRORS: dict[str, type[RagError]] = {
    "unsupported": UnsupportedFileType,
    "empty": EmptyFile,
    "bad_id": InvalidRequest,
    "limit": PayloadTooLarge,
}
MAX_METADATA_KEYS = 64


@dataclass(slots=True)
class FileUpload:
    """One file part: its name, bytes and the document id it gets."""

    filename: str
    data: bytes
    doc_id: str


@dataclass(slots=True)
class _Loaded:
    index: int
    upload: FileUpload
    documents: list[DocumentIn] = field(default_factory=list)
    error: RagError | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _file_id(filename: str) -> str:
    """The document id a file gets by default: its base name (a browser sends only that;
    other clients may send a path), with control characters dropped."""
    base = PurePosixPath(filename.replace("\\", "/")).name
    return re.sub(r"[\x00-\x1f\x7f]", "", base).strip()


async def read_upload(
    form: Any, settings: Settings
) -> tuple[list[FileUpload], dict[str, Any], list[RagError | None]]:
    """The files of a parsed multipart form, the metadata sent along, and for each file the
    error that already rules it out (too large, no usable id), or None."""
    parts = [*form.getall("files", []), *form.getall("file", [])]
    if not parts:
        raise InvalidRequest(
            "no files in the upload: send multipart/form-data with one or more 'files' parts",
            param="files",
        )
    if any(not isinstance(p, UploadFile) for p in parts):
        raise InvalidRequest("'files' parts must be files (with a filename)", param="files")
    if len(parts) > settings.max_upload_files:
        raise PayloadTooLarge(
            f"{len(parts)} files in one upload; the limit is {settings.max_upload_files} "
            "(RAG_MAX_UPLOAD_FILES)",
            param="files",
        )
    ids = [str(i) for i in form.getall("id", [])]
    if ids and len(ids) != len(parts):
        raise InvalidRequest(
            f"{len(ids)} 'id' parts for {len(parts)} files: give one id per file, in order, or "
            "none (ids then come from the file names)",
            param="id",
        )
    metadata = _metadata(form.get("metadata"))
    uploads: list[FileUpload] = []
    errors: list[RagError | None] = []
    for i, part in enumerate(parts):
        name = part.filename or f"file{i + 1}"
        doc_id = ids[i] if ids else _file_id(name)
        data = await part.read()
        await part.close()
        uploads.append(FileUpload(name, data, doc_id))
        param = f"id[{i}]" if ids else f"files[{i}]"
        if len(data) > settings.max_file_bytes:
            errors.append(
                FileTooLarge(
                    f"{name}: {len(data)} bytes; the limit is {settings.max_file_bytes} "
                    "(RAG_MAX_FILE_BYTES)",
                    param=f"files[{i}]",
                )
            )
        elif (problem := id_problem(doc_id)) is not None:
            errors.append(
                InvalidRequest(
                    f"{name}: {doc_id[:80]!r} cannot be a document id: {problem}; send an "
                    "'id' part",
                    param=param,
                )
            )
        else:
            errors.append(None)
    return uploads, metadata, errors


def _metadata(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, UploadFile):
        raise InvalidRequest("'metadata' must be a form field, not a file", param="metadata")
    try:
        value = bounded_json.loads(raw)
    except bounded_json.JsonBoundsError as exc:
        where = f"metadata.{exc.path}" if exc.path else "metadata"
        raise InvalidRequest(f"'metadata' is {exc}", param=where) from exc
    if not isinstance(value, dict):
        raise InvalidRequest("'metadata' must be a JSON object", param="metadata")
    if len(value) > MAX_METADATA_KEYS:
        raise InvalidRequest(
            f"'metadata' has {len(value)} keys; the limit is {MAX_METADATA_KEYS}", param="metadata"
        )
    for key in LAYOUT_KEYS:
        if key in value:
            raise InvalidRequest(
                f"'{key}' comes from the file itself and cannot be sent along",
                param=f"metadata.{key}",
            )
    return value


async def _load(
    loaders: LoaderPool, upload: FileUpload, index: int, extra: dict[str, Any]
) -> _Loaded:
    out = _Loaded(index, upload)
    try:
        docs = await loaders.load(upload.data, upload.filename, upload.doc_id)
    except LoadError as exc:
        kind = _LOAD_ERRORS.get(exc.kind, UnreadableFile)
        message = str(exc)
        if not message.startswith(upload.filename):
            message = f"{upload.filename}: {message}"
        out.error = kind(message, param=f"files[{index}]")
        return out
    first = docs[0].metadata if docs else {}
    out.meta = {k: first[k] for k in ("content_type", "title", "pages") if k in first}
    out.documents = [
        DocumentIn(
            id=d.id, text=d.text, metadata={**d.metadata, "filename": upload.filename, **extra}
        )
        for d in docs
    ]
    return out


async def load_files(
    loaders: LoaderPool,
    uploads: list[FileUpload],
    metadata: dict[str, Any],
    errors: list[RagError | None],
) -> list[_Loaded]:
    """Parse the files not already ruled out, in the loader processes (in parallel, as many
    at once as there are workers); cancelling this kills the processes still parsing."""
    pending = [(i, u) for i, (u, e) in enumerate(zip(uploads, errors, strict=True)) if e is None]
    return list(await asyncio.gather(*(_load(loaders, u, i, metadata) for i, u in pending)))


def _check(loaded: _Loaded, kb: KnowledgeBase, taken: dict[str, str]) -> None:
    """The service's document checks, on this file's documents alone; ids another file of
    the upload already took are refused."""
    for doc in loaded.documents:
        if doc.id in taken:
            loaded.error = InvalidRequest(
                f"{loaded.upload.filename}: document id {doc.id!r} is also the id of "
                f"{taken[doc.id]} in this upload; send an 'id' part for one of them",
                param=f"files[{loaded.index}]",
            )
            return
    try:
        kb.validate_documents(loaded.documents)
    except InvalidRequest as exc:
        detail = re.sub(r"^documents\[\d+\]\.?", "", exc.param or "")
        where = f" ({detail})" if detail else ""
        loaded.error = type(exc)(  # the same class: the same status and code
            f"{loaded.upload.filename}{where}: {exc.message}", param=f"files[{loaded.index}]"
        )
        return
    for doc in loaded.documents:
        taken[doc.id] = loaded.upload.filename


async def store_files(
    kb: KnowledgeBase,
    collection: str,
    uploads: list[FileUpload],
    loaded: list[_Loaded],
    errors: list[RagError | None],
) -> list[FileOutcome]:
    """Check and store the files :func:`load_files` parsed; one outcome per file, in order.
    Raises the error (naming every file) when none of them could be stored."""
    by_index = {item.index: item for item in loaded}
    taken: dict[str, str] = {}
    for item in loaded:
        if item.error is None:
            _check(item, kb, taken)
    good = [item for item in loaded if item.error is None]
    statuses: dict[str, tuple[int, str]] = {}
    limit = kb.settings.max_documents_per_request
    batches: list[list[DocumentIn]] = []
    for ok in good:
        # Whole files per upsert; a file never spans two (each upsert is one transaction).
        if not batches or len(batches[-1]) + len(ok.documents) > limit:
            batches.append([])
        batches[-1].extend(ok.documents)
    for batch in batches:
        outcome = await kb.upsert(collection, batch)
        statuses.update({i: (c, s) for i, c, s in outcome.statuses})
    outcomes: list[FileOutcome] = []
    failures: list[RagError] = []
    for i, upload in enumerate(uploads):
        found = by_index.get(i)
        error = errors[i] or (found.error if found is not None else None)
        if error is not None:
            failures.append(error)
            outcomes.append(
                FileOutcome(
                    filename=upload.filename,
                    status="failed",
                    content_type=CONTENT_TYPES.get(PurePosixPath(upload.filename).suffix.lower()),
                    error=FileError(error.message, error.error_type, error.param, error.code),
                )
            )
            continue
        assert found is not None
        outcomes.append(
            FileOutcome(
                filename=upload.filename,
                status="stored",
                content_type=found.meta.get("content_type"),
                title=found.meta.get("title"),
                pages=found.meta.get("pages"),
                documents=[
                    DocumentStatus(id=d.id, chunks=statuses[d.id][0], status=statuses[d.id][1])  # type: ignore[arg-type]
                    for d in found.documents
                ],
            )
        )
    if not good:
        first = failures[0]
        if len(failures) > 1:
            message = f"none of the {len(failures)} files was stored: " + "; ".join(
                f.message for f in failures
            )
            raise type(first)(message, param=first.param)
        raise first
    return outcomes
