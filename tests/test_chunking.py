from __future__ import annotations

import pytest

from rag_service.chunking import ChunkingConfig, chunk_offsets

TEXT = (
    "Install the package with pip. Then run the service on port 8000.\n\n"
    "Configuration lives in environment variables prefixed RAG_. "
    "Each setting is documented in the help output of the serve command. " * 12
)


@pytest.mark.parametrize(("size", "overlap"), [(32, 0), (32, 8), (64, 16), (254, 40)])
def test_chunks_cover_text_within_budget(embedder, size, overlap):
    offsets = embedder.offsets([TEXT])[0]
    chunks = chunk_offsets(TEXT, offsets, ChunkingConfig(size, overlap))
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert TEXT[c.start : c.end] == c.text
        assert 0 < c.tokens <= size
        assert len(embedder.offsets([c.text])[0]) <= size
    # Together the chunks cover every token of the text.
    covered = set()
    for c in chunks:
        covered |= {i for i, (s, e) in enumerate(offsets) if s >= c.start and e <= c.end}
    assert covered == set(range(len(offsets)))
    if overlap and len(chunks) > 1:
        assert chunks[1].start < chunks[0].end  # consecutive chunks share text


def test_prefers_sentence_boundaries(embedder):
    offsets = embedder.offsets([TEXT])[0]
    chunks = chunk_offsets(TEXT, offsets, ChunkingConfig(48, 8))
    ends = [c.text.rstrip()[-1] for c in chunks[:-1]]
    assert sum(e in ".:;!?" for e in ends) >= len(ends) - 1


def test_short_and_blank_texts(embedder):
    text = "Just one line."
    chunks = chunk_offsets(text, embedder.offsets([text])[0], ChunkingConfig(32, 4))
    assert [(c.start, c.end, c.text) for c in chunks] == [(0, 14, text)]
    assert chunk_offsets("   ", [], ChunkingConfig(32, 4)) == []


def test_config_bounds():
    with pytest.raises(ValueError):
        ChunkingConfig(4, 0)
    with pytest.raises(ValueError):
        ChunkingConfig(32, 30)


def test_collection_chunk_options_apply(client):
    client.post("/v1/collections", json={"name": "small", "chunk_tokens": 16, "chunk_overlap": 0})
    resp = client.post(
        "/v1/collections/small/documents", json={"documents": [{"id": "t", "text": TEXT}]}
    )
    small_chunks = resp.json()["documents"][0]["chunks"]
    resp = client.post(
        "/v1/collections/big/documents", json={"documents": [{"id": "t", "text": TEXT}]}
    )
    assert small_chunks > 4 * resp.json()["documents"][0]["chunks"]


@pytest.mark.parametrize(("size", "overlap"), [(16, 0), (24, 8), (64, 16)])
def test_never_starts_or_ends_inside_a_word(embedder, size, overlap):
    """Words of several word pieces ("reimbursement", "configurability") are never cut: a
    chunk starts at a word's first piece and ends at its last (a playground screenshot once
    showed a passage starting "d within thirty days")."""
    text = (
        "Reimbursement of unsubstantiated expenditures requires countersignatures, and "
        "configurability notwithstanding, decentralisation complicates reconciliation "
    ) * 20
    offsets = embedder.offsets([text])[0]
    chunks = chunk_offsets(text, offsets, ChunkingConfig(size, overlap))
    assert len(chunks) > 3
    for c in chunks:
        assert c.start == 0 or not (text[c.start - 1].isalnum() and text[c.start].isalnum())
        assert c.end == len(text) or not (text[c.end - 1].isalnum() and text[c.end].isalnum())
        assert 0 < c.tokens <= size
    covered = set()
    for c in chunks:
        covered |= {i for i, (s, e) in enumerate(offsets) if s >= c.start and e <= c.end}
    assert covered == set(range(len(offsets)))
