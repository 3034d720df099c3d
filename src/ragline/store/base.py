"""The `VectorStore` protocol, the manifest record it keeps per source file, and metadata filters.

A store owns both the chunks and the manifest, and replaces a document's
chunks and its manifest row in one transaction: that is what makes ingest
crash-safe (a killed run leaves each file either fully old or fully new).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ragline.types import Chunk, Hit

Filters = Mapping[str, Any]
"""Metadata filters: `{"format": "pdf"}` (equals) or `{"source": {"$in": [...]}}` (any of)."""


class StoreError(RuntimeError):
    pass


@dataclass(slots=True)
class DocumentRecord:
    """One source file in the manifest: what was seen on disk and what became of it."""

    doc_id: str
    source: str
    root: str
    size: int
    mtime_ns: int
    sha256: str
    fingerprint: str
    status: str = "indexed"
    error: str = ""
    updated_at: str = ""
    chunk_ids: list[str] = field(default_factory=list)


def check_filters(filters: Filters | None) -> dict[str, tuple[str, Any]]:
    """Validate filters and normalize each to (operator, operand); raises ValueError with the problem."""
    normalized: dict[str, tuple[str, Any]] = {}
    for name, condition in (filters or {}).items():
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ValueError(f"filter field {name!r} must be a plain metadata name (letters, digits, _)")
        if isinstance(condition, Mapping):
            if set(condition) != {"$in"} or not isinstance(condition["$in"], (list, tuple)):
                raise ValueError(f"filter on {name!r}: only {{'$in': [values]}} or a plain value is supported")
            normalized[name] = ("in", list(condition["$in"]))
        else:
            normalized[name] = ("eq", condition)
    return normalized


@runtime_checkable
class VectorStore(Protocol):
    """Chunks with vectors, searchable by cosine similarity under metadata filters."""

    def upsert_document(self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """Replace everything stored for `record.doc_id` (chunks and manifest row) atomically."""
        ...

    def delete_document(self, doc_id: str) -> None: ...

    def documents(self) -> list[DocumentRecord]:
        """The manifest: every source file seen, indexed or failed, with its chunk ids."""
        ...

    def search(self, vector: np.ndarray, k: int, filters: Filters | None = None) -> list[Hit]: ...

    def count(self, filters: Filters | None = None) -> int: ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def clear(self) -> None:
        """Remove every chunk, manifest row and meta value (a full rebuild)."""
        ...

    def persist(self) -> None:
        """Make the search index fast to reopen; data is already durable after each upsert."""
        ...

    def close(self) -> None: ...
