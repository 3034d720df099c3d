"""The composition root: the one place that builds components from the settings.

The CLI, the API and distributed workers all get their components here, so
a config change means the same thing everywhere. Components are built on
first use: `ragline status` never loads the embedding model.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from anyio import to_thread

from ragline import registry
from ragline.config import RerankSettings, RetrieveSettings, Settings, SourceSettings
from ragline.embed.base import Embedder
from ragline.embed.batching import BatchingEmbedder
from ragline.generate.answerer import Answerer
from ragline.generate.base import LLM
from ragline.ingest.chunker import Chunker
from ragline.pipeline import Indexer, Progress
from ragline.retrieve.rerank import Reranker
from ragline.retrieve.retriever import Message, Retrieval, Retriever
from ragline.store.base import Filters, Scope, VectorStore
from ragline.types import Answer, AnswerEvent, Event, StatusEvent

if TYPE_CHECKING:
    from ragline.serve.cache import AnswerCache
    from ragline.serve.db import Database
    from ragline.serve.identity import Authenticator
    from ragline.serve.jobs import JobRunner
    from ragline.serve.limits import RateLimiter
    from ragline.serve.observability import Metrics


class Ragline:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._rerankers: dict[str, Reranker] = {}
        self._rerankers_lock = threading.Lock()

    @cached_property
    def embedder(self) -> Embedder:
        backend = registry.resolve("embedder", self.settings.embedder.backend)
        embedder = backend(self.settings.embedder)
        return BatchingEmbedder(embedder) if self.settings.embedder.batch_queries else embedder

    @cached_property
    def store(self) -> VectorStore:
        return self.open_store(self.settings)

    def open_store(self, settings: Settings) -> VectorStore:
        """A new handle on the store `settings` names (another index, e.g. the target of `ragline store
        migrate`); the caller closes it."""
        backend = registry.resolve("store", settings.store.backend)
        return backend.from_settings(settings)

    @cached_property
    def chunker(self) -> Chunker:
        chunk_tokens = self.settings.chunker.chunk_tokens or self.embedder.max_tokens
        if chunk_tokens > self.embedder.max_tokens:
            raise ValueError(
                f"chunker.chunk_tokens ({chunk_tokens}) is over the embedding model's limit "
                f"({self.embedder.max_tokens}); lower it or leave it unset"
            )
        return Chunker(
            self.embedder.tokenizer, chunk_tokens, self.settings.chunker.overlap_tokens,
            self.settings.embedder.document_prefix,
        )

    @cached_property
    def retriever(self) -> Retriever:
        return Retriever(self.embedder, self.store, self.settings.retrieve, self.reranker, self.query_llm)

    def reranker(self, settings: RerankSettings) -> Reranker:
        """The reranker these settings describe, built once (a request may name another than the config)."""
        key = settings.model_dump_json()
        with self._rerankers_lock:
            if key not in self._rerankers:
                backend = registry.resolve("reranker", settings.backend)
                self._rerankers[key] = backend.from_settings(settings, self.query_llm)
            return self._rerankers[key]

    def query_llm(self) -> LLM | None:
        """The LLM that rewrites queries and reranks by LLM: the cheap one when configured."""
        return self.answerer.cheap_llm or self.answerer.llm

    @cached_property
    def answerer(self) -> Answerer:
        return Answerer.from_settings(self.settings.generate, self.settings.data_dir, self.embedder)

    # --- the service's parts (serve/): built here too, so `ragline keys` and the API share them ------

    @cached_property
    def metrics(self) -> Metrics:
        from ragline.serve.observability import Metrics

        return Metrics()

    @cached_property
    def database(self) -> Database:
        from ragline.serve.db import Database

        return Database.from_settings(self.settings)

    @cached_property
    def redis(self) -> Any:
        """The one Redis client of the rate limiter and the caches (None: in-process ones)."""
        if not self.settings.serve.redis_url:
            return None
        from ragline.serve.limits import redis_client

        return redis_client(self.settings.serve.redis_url)

    @cached_property
    def rate_limiter(self) -> RateLimiter:
        backend = registry.resolve("rate_limiter", "redis" if self.redis is not None else "memory")
        return backend.from_settings(self.settings, self.redis)

    @cached_property
    def answer_cache(self) -> AnswerCache:
        backend = registry.resolve("answer_cache", "redis" if self.redis is not None else "memory")
        return backend.from_settings(self.settings, self.redis)

    @cached_property
    def authenticator(self) -> Authenticator:
        from ragline.serve.identity import Authenticator

        return Authenticator(self.settings.serve.auth, self.database.keys)

    @cached_property
    def job_runner(self) -> JobRunner:
        return self.job_runner_with_paths(())

    def job_runner_with_paths(self, paths: Sequence[SourceSettings]) -> JobRunner:
        """A job runner that also runs the jobs of `paths`: folders a watcher was given that no config lists."""
        from ragline.serve.jobs import JobRunner

        return JobRunner(self, self.database, self.metrics, paths)

    def indexer(self, progress: Progress | None = None, wait_s: float | None = None) -> Indexer:
        """The indexer of this index, run by the configured `engine` (here, or on a Ray cluster); `wait_s`
        queues behind a running ingest for up to that long."""
        if self.settings.engine == "ray":
            from ragline.cluster.ray_ingest import RayIndexer

            return RayIndexer(self.settings, self.chunker, self.embedder, self.store, progress, wait_s)
        return Indexer(
            self.settings.ingest, self.chunker, self.embedder, self.store, self.settings.data_dir, progress, wait_s
        )

    def ask(
        self, question: str, k: int | None = None, filters: Filters | None = None,
        options: RetrieveSettings | None = None, history: Sequence[Message] | None = None, *, scope: Scope,
    ) -> Iterator[Event]:
        """Answer a question from the passages `scope` may read: stage status, answer tokens and checked
        claims, then the answer."""
        yield StatusEvent("retrieve")
        retrieval = self.retriever.search(question, k, filters, options, history, scope=scope)
        yield StatusEvent("generate", len(retrieval.hits))
        for event in self.answerer.stream(question, retrieval.hits):
            yield _with_retrieval(event, retrieval)

    def answer(
        self, question: str, k: int | None = None, filters: Filters | None = None,
        options: RetrieveSettings | None = None, history: Sequence[Message] | None = None, *, scope: Scope,
    ) -> Answer:
        """The final answer of `ask`."""
        *_, final = self.ask(question, k, filters, options, history, scope=scope)
        assert isinstance(final, AnswerEvent)
        return final.answer

    async def aask(
        self, question: str, k: int | None = None, filters: Filters | None = None,
        options: RetrieveSettings | None = None, history: Sequence[Message] | None = None, *, scope: Scope,
    ) -> AsyncIterator[Event]:
        """`ask` for the event loop: building components (a model may be loaded or assembled), retrieval,
        routing and prompt building run in worker threads; generation streams asynchronously."""
        yield StatusEvent("retrieve")
        retrieval = await to_thread.run_sync(
            lambda: self.retriever.search(question, k, filters, options, history, scope=scope)
        )
        yield StatusEvent("generate", len(retrieval.hits))
        answerer = await to_thread.run_sync(lambda: self.answerer)
        async for event in answerer.astream(question, retrieval.hits):
            yield _with_retrieval(event, retrieval)

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()
        with self._rerankers_lock:
            for reranker in self._rerankers.values():
                close = getattr(reranker, "close", None)
                if close is not None:
                    close()
            self._rerankers.clear()


def _with_retrieval(event: Event, retrieval: Retrieval) -> Event:
    """The event, the final answer's timings led by retrieval's, and its note led by retrieval's notes (a
    step skipped or degraded: the answer says so)."""
    if isinstance(event, AnswerEvent):
        answer = event.answer
        answer.timings = {**retrieval.timings, **answer.timings}
        answer.note = "; ".join(note for note in (*retrieval.notes, answer.note) if note)
    return event
