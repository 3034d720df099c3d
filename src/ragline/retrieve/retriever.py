"""The query flow: transform the question, search, fuse, rerank, assemble.

1. **Transforms** (optional, through a chat model): a follow-up is rewritten
   into a standalone question using the chat history; HyDE embeds a
   hypothetical answer instead of the question; multi-query adds phrasings.
2. **Search**: each phrasing is one `SearchRequest` (dense, keyword or
   hybrid) for `candidates` passages; several phrasings are fused with RRF.
3. **Assembly** (retrieve/assemble.py): near-duplicates dropped, the best
   `rerank.candidates` reranked, then MMR and the per-page/per-section caps
   pick `k`, and neighbour expansion joins each hit with its section's
   adjacent chunks.

Every step is chosen by `RetrieveSettings`, from the config or per request
(`options`). Rerankers and the chat model come from the composition root
(app.py) as factories, so a request that names another reranker gets it
built once and reused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ragline.config import RerankSettings, RetrieveSettings
from ragline.embed.base import Embedder, EmbedderUnavailable
from ragline.retrieve import assemble, transform
from ragline.retrieve.rerank import Reranker, RerankError
from ragline.store.base import Filters, Scope, SearchRequest, VectorStore
from ragline.store.fusion import Fusion, fuse
from ragline.types import Hit

if TYPE_CHECKING:
    from ragline.retrieve.chat import ChatModel

log = logging.getLogger(__name__)

Message = dict[str, str]


class RetrievalError(RuntimeError):
    pass


@dataclass(slots=True)
class Retrieval:
    """The hits for one query, the query actually searched, and how long each stage took (ms)."""

    query: str
    hits: list[Hit]
    timings: dict[str, float] = field(default_factory=dict)
    searched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Plan:
    """One query's phrasings: the texts matched by keyword and, beside each, the text embedded."""

    query: str
    keyword_texts: list[str]
    dense_texts: list[str]
    notes: list[str]
    transformed: bool


class Retriever:
    def __init__(
        self,
        embedder: Embedder,
        store: VectorStore,
        settings: RetrieveSettings,
        rerankers: Callable[[RerankSettings], Reranker] | None = None,
        chat_model: Callable[[], ChatModel | None] | None = None,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.settings = settings
        self._rerankers = rerankers
        self._chat_model = chat_model

    def check_index(self) -> None:
        """Refuse to compare vectors of different models: the scores would be meaningless."""
        built_with = self.store.get_meta("embedder")
        if built_with and built_with != self.embedder.name:
            raise RetrievalError(
                f"the index was built with {built_with!r} but the config embeds queries with "
                f"{self.embedder.name!r}: re-run `ragline ingest --full` or fix embedder.model"
            )

    def search(
        self,
        query: str,
        k: int | None = None,
        filters: Filters | None = None,
        options: RetrieveSettings | None = None,
        history: Sequence[Message] | None = None,
        *,
        scope: Scope,
    ) -> Retrieval:
        return self.search_many([query], k, filters, options, history, scope=scope)[0]

    def search_many(
        self,
        queries: Sequence[str],
        k: int | None = None,
        filters: Filters | None = None,
        options: RetrieveSettings | None = None,
        history: Sequence[Message] | None = None,
        *,
        scope: Scope,
    ) -> list[Retrieval]:
        """Search each query within `scope` (k defaults to top_k, at least 1); embeddings are computed in one
        batch. Neighbour expansion reads only the documents of hits, so it stays within the scope too."""
        options = options or self.settings
        k = options.top_k if k is None else k
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.check_index()
        reranker = self._reranker(options.rerank)

        started = time.perf_counter()
        plans = [self._plan(query, options, history) for query in queries]
        transform_ms = _ms_since(started) / max(len(queries), 1)

        started = time.perf_counter()
        vectors = iter([])
        if options.mode != "keyword":
            try:
                vectors = iter(self.embedder.embed_queries([text for plan in plans for text in plan.dense_texts]))
            except EmbedderUnavailable as exc:  # the keyword index still answers: degrade, say so
                log.warning("keyword search only: %s", exc)
                options = options.model_copy(update={"mode": "keyword"})
                for plan in plans:
                    plan.notes.append(f"the embedding model is unavailable, so this was a keyword search: {exc}")
        embed_ms = _ms_since(started) / max(len(queries), 1)

        fusion = Fusion(**options.fusion.model_dump())
        candidates = max(options.candidates, k)
        results = []
        for plan in plans:
            started = time.perf_counter()
            lists = []
            for keyword_text, _ in zip(plan.keyword_texts, plan.dense_texts):
                request = SearchRequest(
                    scope=scope, text=keyword_text, vector=next(vectors, None), mode=options.mode, filters=filters,
                    k=candidates, fusion=fusion, with_vectors=options.mmr_lambda is not None,
                )
                lists.append(self.store.search(request))
            hits = lists[0] if len(lists) == 1 else fuse(lists, [1.0] * len(lists), "rrf", fusion.rrf_k, candidates)
            search_ms = _ms_since(started)

            started = time.perf_counter()
            if options.dedupe:
                hits = assemble.dedupe(hits)
            rerank_ms = 0.0
            if reranker is not None and hits:
                hits = self._rerank(reranker, plan, hits[: options.rerank.candidates], hits[options.rerank.candidates:])
                rerank_ms = _ms_since(started)
            started = time.perf_counter()
            hits = assemble.diversify(hits, k, options.mmr_lambda, options.max_per_page, options.max_per_section)
            hits = assemble.expand(hits, options.expand_neighbours, self.store.document_chunks)
            ran = {  # the stages this query went through, and how long each took
                "transform_ms": transform_ms if plan.transformed else None,
                "embed_ms": embed_ms if options.mode != "keyword" else None,
                "search_ms": search_ms,
                "rerank_ms": rerank_ms if reranker is not None else None,
                "assemble_ms": _ms_since(started),
            }
            timings = {name: round(ms, 2) for name, ms in ran.items() if ms is not None}
            results.append(Retrieval(plan.query, hits, timings, plan.keyword_texts, plan.notes))
        return results

    def _reranker(self, settings: RerankSettings) -> Reranker | None:
        if settings.backend == "none":
            return None
        if self._rerankers is None:
            raise RetrievalError(f"reranker {settings.backend!r} asked for, but this retriever was built without rerankers")
        try:
            return self._rerankers(settings)
        except RerankError as exc:  # a misconfigured reranker is the user's to fix: say so, do not degrade silently
            raise RetrievalError(f"cannot build the {settings.backend} reranker: {exc}") from exc

    @staticmethod
    def _rerank(reranker: Reranker, plan: _Plan, head: list[Hit], tail: list[Hit]) -> list[Hit]:
        """The head reranked, the tail after it in its order (scored below the head, so that MMR keeps it there).

        A reranker that fails (a server down) leaves the first ranking in place, with a note: a search
        must not fail for want of a second opinion.
        """
        try:
            head = reranker.rerank(plan.query, head)
        except RerankError as exc:
            log.warning("reranking skipped: %s", exc)
            plan.notes.append(f"reranking skipped: {exc}")
            return head + tail
        floor = min((hit.score for hit in head), default=0.0)
        return head + [replace(hit, score=floor - (i + 1) * 1e-6) for i, hit in enumerate(tail)]

    def _plan(self, query: str, options: RetrieveSettings, history: Sequence[Message] | None) -> _Plan:
        """The phrasings to search for one query, after the transforms the options ask for."""
        wanted = options.transforms
        needs_model = (wanted.rewrite_history and history) or wanted.hyde or wanted.multi_query
        model = self._chat_model() if needs_model and self._chat_model is not None else None
        notes: list[str] = []
        if needs_model and model is None:
            notes.append("query transforms skipped: no LLM is configured")
        standalone = query
        if model is not None and wanted.rewrite_history and history:
            standalone = transform.rewrite_with_history(model, query, list(history), notes)
        phrasings = [standalone]
        if model is not None and wanted.multi_query:
            phrasings += transform.multi_query(model, standalone, wanted.multi_query, notes)
        dense_texts = list(phrasings)
        if model is not None and wanted.hyde:
            dense_texts = [transform.hyde(model, text, notes) for text in phrasings]
        return _Plan(standalone, phrasings, dense_texts, notes, transformed=model is not None)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
