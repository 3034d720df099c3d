"""Dense retrieval: embed the query, search the store under metadata filters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from ragline.embed.base import Embedder
from ragline.store.base import Filters, VectorStore
from ragline.types import Hit


class RetrievalError(RuntimeError):
    pass


@dataclass(slots=True)
class Retrieval:
    """The hits for one query and how long each stage took, in milliseconds."""

    query: str
    hits: list[Hit]
    timings: dict[str, float] = field(default_factory=dict)


class DenseRetriever:
    def __init__(self, embedder: Embedder, store: VectorStore, top_k: int = 5) -> None:
        self.embedder = embedder
        self.store = store
        self.top_k = top_k

    def check_index(self) -> None:
        """Refuse to compare vectors of different models: the scores would be meaningless."""
        built_with = self.store.get_meta("embedder")
        if built_with and built_with != self.embedder.name:
            raise RetrievalError(
                f"the index was built with {built_with!r} but the config embeds queries with "
                f"{self.embedder.name!r}: re-run `ragline ingest --full` or fix embedder.model"
            )

    def search(self, query: str, k: int | None = None, filters: Filters | None = None) -> Retrieval:
        return self.search_many([query], k, filters)[0]

    def search_many(
        self, queries: Sequence[str], k: int | None = None, filters: Filters | None = None
    ) -> list[Retrieval]:
        """Embed all queries in one batch, then search each (k defaults to top_k and must be at least 1)."""
        k = self.top_k if k is None else k
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.check_index()
        started = time.perf_counter()
        vectors = self.embedder.embed_queries(list(queries))
        embed_ms = (time.perf_counter() - started) * 1000 / max(len(queries), 1)
        results = []
        for query, vector in zip(queries, vectors):
            started = time.perf_counter()
            hits = self.store.search(vector, k, filters)
            search_ms = (time.perf_counter() - started) * 1000
            results.append(Retrieval(query, hits, {"embed_ms": round(embed_ms, 2), "search_ms": round(search_ms, 2)}))
        return results
