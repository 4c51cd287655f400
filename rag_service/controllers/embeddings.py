"""POST /v1/embeddings, in the OpenAI shape."""

from __future__ import annotations

import base64

from litestar import Controller, post
from litestar.di import Provide
from litestar.status_codes import HTTP_200_OK

from rag_service.dependencies import provide_kb
from rag_service.errors import InvalidRequest, ModelNotFound
from rag_service.knowledge import KnowledgeBase
from rag_service.openapi import error_responses
from rag_service.schemas import EmbeddingData, EmbeddingsRequest, EmbeddingsResponse, Usage

__all__ = ["EmbeddingsController"]


class EmbeddingsController(Controller):
    path = "/embeddings"
    dependencies = {"kb": Provide(provide_kb, sync_to_thread=False)}

    @post(
        "/",
        status_code=HTTP_200_OK,
        opt={"access": "key"},
        responses=error_responses(404),
    )
    async def create(self, data: EmbeddingsRequest, kb: KnowledgeBase) -> EmbeddingsResponse:
        """Vectors by the default embedding model, or by ``model``: any model loaded here (a
        collection's, see /v1/collections)."""
        model = kb.models.find(data.model) if data.model else kb.models.default
        if model is None:
            served = ", ".join(repr(m.id) for m in kb.models.loaded())
            raise ModelNotFound(
                f"model {data.model!r} is not served here; use one of {served}", param="model"
            )
        name = model.id
        if data.dimensions is not None and data.dimensions != model.dimension:
            raise InvalidRequest(
                f"{name} makes {model.dimension}-dimensional vectors", param="dimensions"
            )
        given = [data.input] if isinstance(data.input, str) else data.input
        texts = [text for text in given if isinstance(text, str)]
        if len(texts) != len(given):
            raise InvalidRequest(
                "input holds token ids; this service embeds text with its own model's "
                "tokenizer, so send the text itself (LangChain's OpenAIEmbeddings sends token "
                "ids unless created with check_embedding_ctx_length=False)",
                param="input",
            )
        limit = kb.settings.max_query_chars
        for i, text in enumerate(texts):
            where = "input" if isinstance(data.input, str) else f"input[{i}]"
            if not text.strip():
                raise InvalidRequest("input must not be empty", param=where)
            if len(text) > limit:
                raise InvalidRequest(f"input is longer than {limit} characters", param=where)
        vectors, tokens = await kb.embed_queries(texts, model)
        items = [
            EmbeddingData(
                index=i,
                embedding=(
                    base64.b64encode(v.astype("<f4").tobytes()).decode()
                    if data.encoding_format == "base64"
                    else v.tolist()
                ),
            )
            for i, v in enumerate(vectors)
        ]
        return EmbeddingsResponse(
            data=items, model=name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens)
        )
