"""POST /v1/embeddings, in the OpenAI shape. A request that surely holds more tokens than
RAG_MAX_EMBEDDING_TOKENS is refused (413) before it is tokenised (:func:`token_floor`)."""

from __future__ import annotations

import asyncio
import base64
import re

from litestar import Controller, post
from litestar.di import Provide
from litestar.status_codes import HTTP_200_OK

from rag_service.dependencies import provide_kb
from rag_service.errors import InvalidRequest, ModelNotFound, PayloadTooLarge
from rag_service.knowledge import KnowledgeBase
from rag_service.openapi import error_responses
from rag_service.schemas import EmbeddingData, EmbeddingsRequest, EmbeddingsResponse, Usage

__all__ = ["EmbeddingsController"]


# A whitespace-separated word with an ASCII letter or digit in it is at least one token for
# every tokenizer of a sentence-transformers model: WordPiece, byte-level BPE and SentencePiece
# never join words across whitespace, and their normalisers keep ASCII letters and digits.
_ALNUM = re.compile(r"[A-Za-z0-9]")


def token_floor(texts: list[str], window: int) -> int:
    """A lower bound on the tokens ``texts`` hold as the model sees them (each capped at its
    ``window``), counted without tokenising: enough to refuse a request that cannot meet
    RAG_MAX_EMBEDDING_TOKENS before seconds of tokenising (2,048 inputs of 8,192 characters
    took 13.7 s to be refused)."""
    total = 0
    for text in texts:
        words = text.split(maxsplit=window)  # at most window + 1 pieces
        total += min(window, sum(1 for word in words if _ALNUM.search(word)))
    return total


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
        window = model.embedder.max_seq_length
        floor = (
            token_floor(texts, window)
            if len(texts) <= kb.settings.interactive_max_texts
            else await asyncio.to_thread(token_floor, texts, window)  # 2,048 inputs: 0.3 s
        )
        if floor > kb.settings.max_embedding_tokens:
            raise PayloadTooLarge(
                f"the input holds at least {floor} tokens; one request may hold at most "
                f"{kb.settings.max_embedding_tokens} (RAG_MAX_EMBEDDING_TOKENS): split it",
                param="input",
            )
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
