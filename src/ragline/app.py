"""The composition root: the one place that builds components from the settings.

The CLI, the API and distributed workers all get their components here, so
a config change means the same thing everywhere. Components are built on
first use: `ragline status` never loads the embedding model.
"""

from __future__ import annotations

from functools import cached_property

from ragline import registry
from ragline.config import Settings
from ragline.embed.base import Embedder
from ragline.ingest.chunker import Chunker
from ragline.pipeline import Indexer, Progress
from ragline.retrieve.dense import DenseRetriever
from ragline.store.base import VectorStore


class Ragline:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def embedder(self) -> Embedder:
        backend = registry.resolve("embedder", self.settings.embedder.backend)
        return backend(self.settings.embedder)

    @cached_property
    def store(self) -> VectorStore:
        backend = registry.resolve("store", self.settings.store.backend)
        return backend.from_settings(self.settings)

    @cached_property
    def chunker(self) -> Chunker:
        chunk_tokens = self.settings.chunker.chunk_tokens or self.embedder.max_tokens
        if chunk_tokens > self.embedder.max_tokens:
            raise ValueError(
                f"chunker.chunk_tokens ({chunk_tokens}) is over the embedding model's limit "
                f"({self.embedder.max_tokens}); lower it or leave it unset"
            )
        return Chunker(self.embedder.tokenizer, chunk_tokens, self.settings.chunker.overlap_tokens)

    @cached_property
    def retriever(self) -> DenseRetriever:
        return DenseRetriever(self.embedder, self.store, self.settings.retrieve.top_k)

    def indexer(self, progress: Progress | None = None) -> Indexer:
        return Indexer(self.settings.ingest, self.chunker, self.embedder, self.store, progress)

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()
