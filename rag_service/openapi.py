"""The OpenAPI description: configuration, and the error responses each route documents.

Every route lists the statuses it can answer with besides success, each with the one error
body of :mod:`rag_service.errors`, so the schema at /schema/openapi.json is honest enough for
schemathesis to hold the service to it (tests/test_fuzz.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Router
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.openapi import ResponseSpec
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
)
from litestar.static_files import create_static_files_router

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.typing import FieldDefinition

__all__ = [
    "ChatCompletionOperation",
    "ErrorBody",
    "ErrorDetail",
    "StreamingOperation",
    "StrictStructSchemaPlugin",
    "docs_assets_router",
    "error_responses",
    "multipart_operation",
    "openapi_config",
]

# Swagger UI's files, served by the service itself (from the swagger-ui-bundle package), so
# the interactive page works on a machine with no internet access.
DOCS_ASSETS = "/schema/assets"


_DESCRIPTIONS = {
    400: "Invalid request: the body, a parameter or a field (named in `param`) is wrong",
    401: "Missing or invalid API key",
    403: "The API key lacks the scope this request needs; without RAG_API_KEY, a request "
    "from another website or to an unknown Host",
    404: "Collection, document, model or adapter not found",
    409: "Conflict: it exists already, or was embedded by another model",
    413: "The request is past a size limit (named in the message)",
    415: "A body that is not sent as JSON (Content-Type), or a file of a type the service "
    "cannot read",
    422: "A file that does not parse: corrupt, encrypted, or a PDF without a text layer",
    502: "The generation server failed or answered malformed data",
    503: "Loading, overloaded or the store is busy: retry after the Retry-After header",
    504: "The generation server did not answer in time",
}
# What every /v1 route can answer: bad input, keys and scopes, size limits, not ready.
V1_COMMON = (400, 401, 403, 413, 415, 503)


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    """The OpenAI error shape, used by every error response."""

    error: ErrorDetail


def error_responses(*statuses: int, v1: bool = True) -> dict[int, ResponseSpec]:
    """``responses=`` for a route handler: the common /v1 statuses plus ``statuses``."""
    codes = sorted({*(V1_COMMON if v1 else ()), *statuses})
    return {
        code: ResponseSpec(
            data_container=ErrorBody, description=_DESCRIPTIONS[code], generate_examples=False
        )
        for code in codes
    }


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="rag-service",
        version="1",
        description=(
            "Knowledge over HTTP, OpenAI-compatible chat and embeddings, hot-loaded adapters. "
            'Errors use the OpenAI shape {"error": {"message", "type", "param", "code"}}.'
        ),
        path="/schema",
        render_plugins=[
            EcmaPatternJsonRenderPlugin(),
            SwaggerRenderPlugin(
                js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                standalone_preset_js_url=f"{DOCS_ASSETS}/swagger-ui-standalone-preset.js",
                path="/",  # /schema: the interactive page; /schema/openapi.json: the JSON
                favicon=f"<link rel='icon' href='{DOCS_ASSETS}/favicon-32x32.png'>",
            ),
        ],
    )


class EcmaPatternJsonRenderPlugin(JsonRenderPlugin):
    """The schema as JSON, with its ``pattern`` strings in the dialect OpenAPI documents
    (ECMA-262). The service anchors its patterns with ``\\A`` and ``\\Z`` (Python's ``$``
    also matches before a final newline, see :mod:`rag_service.ids`); ECMA-262 has neither,
    and its ``^`` and ``$`` (without the multiline flag) mean exactly what they do."""

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, _ecma_patterns(openapi_schema))


def _ecma_patterns(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (
                v.replace("\\A", "^").replace("\\Z", "$")
                if k == "pattern" and isinstance(v, str)
                else _ecma_patterns(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_ecma_patterns(v) for v in value]
    return value


def docs_assets_router() -> Router:
    """Swagger UI's JavaScript and CSS at :data:`DOCS_ASSETS` (no key needed, like /schema)."""
    from swagger_ui_bundle import swagger_ui_path

    return create_static_files_router(
        path=DOCS_ASSETS,
        directories=[Path(str(swagger_ui_path))],
        include_in_schema=False,
        name="docs-assets",
    )


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Structs that refuse unknown fields say so in the schema (``additionalProperties:
    false``); Litestar's own plugin leaves it open, which would promise clients that extra
    fields are accepted when the service answers them with a 400."""

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        if field_definition.type_.__struct_config__.forbid_unknown_fields:
            schema.additional_properties = False
        return schema


@dataclass
class StreamingOperation(Operation):
    """An operation whose 200 is JSON, or an SSE stream when the request asks for one."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = {
                **(ok.content or {}),
                "text/event-stream": OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.STRING,
                        description='"data: {chunk}" events, ending with "data: [DONE]"',
                    )
                ),
            }


def _citation_schema() -> Schema:
    integer = Schema(type=OpenAPIType.INTEGER)
    return Schema(
        type=OpenAPIType.OBJECT,
        description="The verdict on one citation of one sentence (rag.citations: verify)",
        properties={
            "index": Schema(type=OpenAPIType.INTEGER, description="the source cited"),
            "sentence": Schema(
                type=OpenAPIType.STRING, description="the sentence: content[start:end]"
            ),
            "start": integer,
            "end": integer,
            "status": Schema(
                type=OpenAPIType.STRING,
                enum=["supported", "unsupported", "added"],
                description="unsupported: its marker was dropped; added: the service cited it",
            ),
            "score": Schema(
                type=[OpenAPIType.NUMBER, OpenAPIType.NULL],
                description="support, 0-1 (null: no such source)",
            ),
        },
        required=["index", "sentence", "start", "end", "status", "score"],
    )


@dataclass
class ChatCompletionOperation(StreamingOperation):
    """The chat route: the OpenAI response plus what this service adds to it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = (self.responses or {}).get("200")
        if not isinstance(ok, OpenAPIResponse):
            return
        sources = Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(type=OpenAPIType.OBJECT),
            description=(
                'The numbered sources: {"index", "document_id", "chunk_id", "text", "score", '
                '"metadata"}, plus "cited" (true/false) under rag.citations: verify. In a '
                "stream: on the first chunk; the last chunk carries [{index, cited}]."
            ),
        )
        body = Schema(
            type=OpenAPIType.OBJECT,
            description="An OpenAI chat.completion (or, streamed, chat.completion.chunk events)",
            properties={
                "sources": sources,
                "retrieval": Schema(
                    type=OpenAPIType.OBJECT,
                    description='{"collection", "searched", "reason"}: what retrieval did',
                ),
                "citations": Schema(
                    type=OpenAPIType.ARRAY,
                    items=_citation_schema(),
                    description=(
                        "rag.citations: verify only: the verdicts, offsets into the returned "
                        "content (a stream: on its last chunk, offsets into the streamed text)"
                    ),
                ),
                "citations_error": Schema(
                    type=OpenAPIType.STRING,
                    description="Why the citations could not be checked (answer unchanged)",
                ),
            },
        )
        ok.content = {**(ok.content or {}), "application/json": OpenAPIMediaType(schema=body)}


def multipart_operation(fields: dict[str, tuple[str, bool, str]]) -> type[Operation]:
    """An operation class whose request body is ``multipart/form-data`` with ``fields``:
    name -> (``"binary"`` for a file or ``"string"``, whether it may repeat, description).
    (The handler reads the form itself, to name each bad file in its own error.)"""

    def part(kind: str, description: str) -> Schema:
        if kind == "binary":
            return Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
        return Schema(type=OpenAPIType.STRING, description=description)

    properties: dict[str, Schema | Reference] = {
        name: (
            Schema(type=OpenAPIType.ARRAY, items=part(kind, about), description=about)
            if repeats
            else part(kind, about)
        )
        for name, (kind, repeats, about) in fields.items()
    }
    body = RequestBody(
        required=True,
        content={
            "multipart/form-data": OpenAPIMediaType(
                schema=Schema(type=OpenAPIType.OBJECT, properties=properties, required=["files"])
            )
        },
    )

    @dataclass
    class MultipartOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = body

    return MultipartOperation
