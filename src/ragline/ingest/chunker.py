"""Cut sections into chunks that fit the embedding model, never across a section boundary.

Splitting is recursive on paragraph → line → sentence → word boundaries
(semantic-text-splitter), with size and overlap counted in tokens of the
embedding model's own tokenizer. The budget includes the embedder's
document prefix (e.g. `passage: `), the heading path that is prepended to
every chunk's embedded text and the model's special tokens, so nothing the
model sees is truncated.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from semantic_text_splitter import TextSplitter
from tokenizers import Tokenizer

from ragline.types import Chunk, Document, Section, heading_prefix, utc_now

SPECIAL_TOKENS = 2  # [CLS] and [SEP] for BERT-style models; a safe margin for others


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def chunk_id(doc_id: str, text_hash: str, occurrence: int) -> str:
    """Deterministic: the same document content always yields the same ids."""
    key = f"{doc_id}\x00{text_hash}\x00{occurrence}".encode("utf-8")
    return hashlib.sha256(key).hexdigest()[:32]


class Chunker:
    """Token-bounded, section-aware chunking with overlap."""

    def __init__(
        self, tokenizer: Tokenizer, chunk_tokens: int, overlap_tokens: int, document_prefix: str = ""
    ) -> None:
        if overlap_tokens >= chunk_tokens // 2:
            raise ValueError(
                f"overlap_tokens ({overlap_tokens}) must be less than half of chunk_tokens ({chunk_tokens})"
            )
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.document_prefix = document_prefix
        self._reserved = SPECIAL_TOKENS + (self.count_tokens(document_prefix) if document_prefix else 0)
        if self._reserved >= chunk_tokens // 4:
            raise ValueError(
                f"the embedder's document_prefix takes {self._reserved - SPECIAL_TOKENS} tokens, too many for "
                f"chunks of {chunk_tokens} tokens; shorten it or raise chunker.chunk_tokens"
            )
        self._splitters: dict[int, TextSplitter] = {}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _splitter(self, capacity: int) -> TextSplitter:
        """A splitter per capacity, rounded down to a multiple of 8: building one costs ~20 ms."""
        capacity -= capacity % 8
        splitter = self._splitters.get(capacity)
        if splitter is None:
            overlap = min(self.overlap_tokens, capacity // 2 - 1)
            splitter = TextSplitter.from_huggingface_tokenizer(self.tokenizer, capacity, overlap=max(overlap, 0))
            self._splitters[capacity] = splitter
        return splitter

    def fit_heading(self, heading_path: tuple[str, ...]) -> tuple[str, ...]:
        """The heading path the chunk is embedded with: at most half the budget.

        Outer headings are dropped first (the innermost says most about the
        passage); a single heading that is still too long is cut.
        """
        budget = self.chunk_tokens // 2 - self._reserved
        path = list(heading_path)
        while path and self.count_tokens(heading_prefix(path)) > budget:
            if len(path) > 1:
                path.pop(0)
            else:
                offsets = self.tokenizer.encode(path[0], add_special_tokens=False).offsets
                path[0] = path[0][: offsets[budget - 2][1]]
        return tuple(path)

    def split_section(self, section: Section) -> list[tuple[int, str]]:
        """(character offset, text) of each chunk; each is a trimmed slice of the section text."""
        prefix = heading_prefix(self.fit_heading(section.heading_path))
        capacity = self.chunk_tokens - self._reserved - (self.count_tokens(prefix) if prefix else 0)
        stripped = section.text.strip()
        if stripped and self.count_tokens(stripped) <= capacity:
            # Most sections fit whole: one tokenizer pass instead of the splitter's search.
            return [(section.text.index(stripped), stripped)]
        return self._splitter(capacity).chunk_indices(section.text)

    def chunk(self, document: Document, ingested_at: str | None = None) -> list[Chunk]:
        ingested_at = ingested_at or utc_now()
        chunks: list[Chunk] = []
        seen: Counter[str] = Counter()
        for section in document.sections:
            heading_path = self.fit_heading(section.heading_path)
            heading = heading_prefix(heading_path)
            for _offset, text in self.split_section(section):
                digest = content_hash(f"{heading}\x00{section.anchor}\x00{text}")
                occurrence = seen[digest]
                seen[digest] += 1
                metadata = {
                    "source": document.source,
                    "url": document.url,
                    "anchor": section.anchor,
                    "title": section.title or document.title,
                    "doc_title": document.title,
                    "heading_path": list(heading_path),
                    "page": section.page,
                    "format": document.format,
                    "chunk_index": len(chunks),
                    "content_hash": digest,
                    "ingested_at": ingested_at,
                }
                chunks.append(Chunk(chunk_id(document.doc_id, digest, occurrence), document.doc_id, text, metadata))
        return chunks
