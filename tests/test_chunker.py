"""Chunking properties: no text lost, size bound and overlap honoured, sections never crossed."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragline.ingest.chunker import Chunker
from ragline.types import Document, Section

WORDS = st.sampled_from(
    "the a retrieval vector index Ray Serve configuring batch format ünïcode 数据 naïve "
    "supercalifragilisticexpialidocious x=1; def f(): return 42 https://example.org/a/b?c=d".split()
)
SEPARATORS = st.sampled_from([" ", " ", " ", "\n", "\n\n", ". ", "\t"])
TEXT = st.lists(st.tuples(WORDS, SEPARATORS), min_size=1, max_size=400).map(lambda p: "".join(a + b for a, b in p))
HEADINGS = st.lists(st.sampled_from(["Ray Data", "Transforming data", "Batch format", "A fairly long heading " * 3]), max_size=4)


@pytest.fixture(scope="module")
def tokenizer(embedder):
    return embedder.tokenizer


def make_section(text: str, headings: list[str]) -> Section:
    return Section(text=text, title=headings[-1] if headings else "", anchor="s", heading_path=tuple(headings))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, headings=HEADINGS, chunk_tokens=st.integers(40, 256), overlap=st.integers(0, 19))
def test_chunks_cover_text_fit_budget_and_overlap_little(tokenizer, text, headings, chunk_tokens, overlap):
    chunker = Chunker(tokenizer, chunk_tokens, overlap)
    section = make_section(text, headings)
    pieces = chunker.split_section(section)
    covered = [False] * len(text)
    for offset, piece in pieces:
        assert text[offset : offset + len(piece)] == piece
        covered[offset : offset + len(piece)] = [True] * len(piece)
    lost = [c for c, seen in zip(text, covered) if not seen and not c.isspace()]
    assert lost == [], "text outside every chunk"
    chunks = chunker.chunk(Document("d", "/x.md", "u", "markdown", "T", [section]))
    for chunk in chunks:
        with_specials = len(tokenizer.encode(chunk.embed_text).ids)
        assert with_specials <= chunk_tokens
    for (start_a, a), (start_b, _b) in zip(pieces, pieces[1:]):
        shared = text[start_b : start_a + len(a)]
        assert chunker.count_tokens(shared) <= overlap + 1  # +1: a word split at the edge


PREFIX = "Represent this passage for retrieving supporting documents: "


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, headings=HEADINGS, chunk_tokens=st.integers(64, 256))
def test_the_document_prefix_counts_in_the_budget(tokenizer, text, headings, chunk_tokens):
    chunker = Chunker(tokenizer, chunk_tokens, 8, document_prefix=PREFIX)
    for chunk in chunker.chunk(Document("d", "x.md", "u", "markdown", "T", [make_section(text, headings)])):
        assert len(tokenizer.encode(PREFIX + chunk.embed_text).ids) <= chunk_tokens  # what the model sees


def test_a_prefix_that_leaves_no_room_is_refused(tokenizer):
    with pytest.raises(ValueError, match="document_prefix"):
        Chunker(tokenizer, 32, 4, document_prefix=PREFIX)


def test_overlap_is_used_on_long_prose(tokenizer):
    sentence = "Ray Data streams blocks between operators so memory stays bounded. "
    chunker = Chunker(tokenizer, 64, 16)
    pieces = chunker.split_section(make_section(sentence * 40, ["Ray Data"]))
    assert len(pieces) > 5
    assert any(start_b < start_a + len(a) for (start_a, a), (start_b, _) in zip(pieces, pieces[1:]))


def test_chunks_never_cross_sections_and_carry_metadata(tokenizer):
    doc = Document(
        "doc1", "/docs/guide.md", "https://x.org/guide.html", "markdown", "Guide",
        [
            Section("Alpha text. " * 60, "Alpha", "alpha", ("Guide", "Alpha")),
            Section("Beta text.", "Beta", "beta", ("Guide", "Beta"), page=None),
        ],
    )
    chunks = Chunker(tokenizer, 48, 8).chunk(doc, ingested_at="2026-01-01T00:00:00+00:00")
    assert all("Beta" not in c.text for c in chunks if c.metadata["anchor"] == "alpha")
    assert chunks[-1].text == "Beta text." and chunks[-1].metadata["anchor"] == "beta"
    assert chunks[-1].embed_text == "Guide > Beta\n\nBeta text."
    assert chunks[-1].citation_url == "https://x.org/guide.html#beta"
    assert [c.metadata["chunk_index"] for c in chunks] == list(range(len(chunks)))
    assert {c.metadata["ingested_at"] for c in chunks} == {"2026-01-01T00:00:00+00:00"}
    assert len({c.chunk_id for c in chunks}) == len(chunks)


def test_chunk_ids_are_deterministic_and_content_addressed(tokenizer):
    chunker = Chunker(tokenizer, 48, 0)
    base = [Section("Same paragraph.\n\nSame paragraph.", "S", "s", ("S",)), Section("Other.", "O", "o", ("O",))]
    first = chunker.chunk(Document("d", "/a", "u", "text", "T", base))
    again = chunker.chunk(Document("d", "/a", "u", "text", "T", base))
    edited = chunker.chunk(Document("d", "/a", "u", "text", "T", [base[0], Section("Changed.", "O", "o", ("O",))]))
    assert [c.chunk_id for c in first] == [c.chunk_id for c in again]
    assert first[0].chunk_id == edited[0].chunk_id and first[-1].chunk_id != edited[-1].chunk_id
    other_doc = chunker.chunk(Document("e", "/b", "u", "text", "T", base))
    assert not {c.chunk_id for c in first} & {c.chunk_id for c in other_doc}


def test_overlap_must_be_smaller_than_half_the_chunk(tokenizer):
    with pytest.raises(ValueError, match="overlap_tokens"):
        Chunker(tokenizer, 64, 40)
