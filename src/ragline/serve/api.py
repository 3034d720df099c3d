"""The FastAPI application factory.

Handlers are async and never block the event loop: embedding, search, routing
and prompt building run in worker threads, generation streams from one, and
the models load at startup in a thread while `/readyz` reports their state.
Answers are generated under a bounded queue: beyond it a 503 with
`Retry-After`, never a frozen server. A client that leaves mid-stream cancels
its generation, which frees the model for the next one.

Every error is JSON `{"code", "message"}` with no stack trace and no host path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from ragline import __version__
from ragline.app import Ragline
from ragline.config import ConfigError, RetrieveSettings, Settings, retrieve_options
from ragline.retrieve.retriever import RetrievalError
from ragline.serve.readiness import Admission, GenerationQueue, Readiness, Unavailable, without_host_paths
from ragline.store.base import FilterError, StoreError, check_filters
from ragline.types import AnswerEvent

log = logging.getLogger(__name__)


class ChatTurn(BaseModel):
    role: Literal["user", "assistant"]
    content: str = Field(max_length=8000)


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    k: int | None = Field(default=None, ge=1, le=100, description="passages (default: retrieve.top_k)")
    filters: dict[str, Any] | None = Field(
        default=None, description='metadata filters: {"format": "pdf"} or {"source": {"$in": [...]}}'
    )
    options: dict[str, Any] | None = Field(
        default=None,
        description='retrieval settings for this request, e.g. {"mode": "keyword", "rerank": {"backend": "llm"}}',
    )
    history: list[ChatTurn] | None = Field(
        default=None, max_length=50, description="the conversation so far; a follow-up is rewritten to stand alone"
    )

    def turns(self) -> list[dict[str, str]] | None:
        return [turn.model_dump() for turn in self.history] if self.history else None


class HitOut(BaseModel):
    score: float
    text: str
    title: str
    url: str
    source: str
    heading_path: list[str]
    page: int | None
    chunk_id: str


class SearchResponse(BaseModel):
    query: str = Field(description="the question searched (a follow-up rewritten to stand alone)")
    hits: list[HitOut]
    timings: dict[str, float]
    notes: list[str] = Field(default_factory=list, description="steps skipped, e.g. a reranker that was down")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": without_host_paths(message)}, status_code=status, headers=headers)


def _error_event(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": without_host_paths(message)}


def _public(event: dict[str, Any]) -> dict[str, Any]:
    """An answer event as clients see it: notes may quote errors, which may name host paths."""
    if event.get("note"):
        event["note"] = without_host_paths(event["note"])
    return event


class _AnswerStream(StreamingResponse):
    """A stream that stops generating when the client leaves and always gives its queue place back.

    Starlette cancels the body when the client disconnects; closing the body
    here as well covers a stream that never started, and the place in the
    queue is released whatever happened.
    """

    def __init__(self, lines: AsyncGenerator[str, None], admission: Admission):
        super().__init__(lines, media_type="application/x-ndjson")
        self._lines = lines
        self._admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._lines.aclose()
            self._admission.release()


def _load_components(ragline: Ragline, ready: Readiness) -> None:
    """Build and load everything a request may need, in the order requests need it (a worker thread)."""
    ready.load("store", lambda: f"{ragline.store.count()} chunks")
    if ready.load("embedder", lambda: ragline.embedder.name) and ready.components["store"].status == "ready":
        ragline.retriever  # noqa: B018  (built here, not on the event loop)

    def load_answerer() -> str:
        ragline.answerer.load()  # may first assemble and verify a model
        return ragline.answerer.llm.name if ragline.answerer.llm else "extractive: answers without an LLM"

    routed = "cheap_llm" in ready.components
    if not ready.load("llm", load_answerer):
        if routed:
            ready.components["cheap_llm"] = ready.components["llm"]
        return
    answerer = ragline.answerer
    if answerer.unavailable:
        ready.degrade("llm", f"answers are extracted from the documents: {answerer.unavailable}")
    if routed and answerer.cheap_unavailable:
        ready.degrade("cheap_llm", f"the strong model answers every question: {answerer.cheap_unavailable}")
    elif routed:
        ready.load("cheap_llm", lambda: answerer.cheap_llm.name if answerer.cheap_llm else "")


def create_app(settings: Settings, components: Ragline | None = None) -> FastAPI:
    """Build the API over the components of the composition root (built from `settings` if not given)."""
    ragline = components or Ragline(settings)
    serve = settings.serve
    names = ["store", "embedder", "llm"]
    if settings.generate.router.enabled:
        names.append("cheap_llm")
    ready = Readiness(names, retry_after_s=serve.busy_retry_after_s)
    queue = GenerationQueue(serve.max_concurrent_generations, serve.max_queued_generations, serve.busy_retry_after_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(
            to_thread.run_sync(_load_components, ragline, ready, abandon_on_cancel=True)
        )
        try:
            yield
        finally:
            loading.cancel()
            ragline.close()

    api = FastAPI(title="Ragline", version=__version__, lifespan=lifespan)
    api.state.readiness = ready
    api.state.generations = queue

    @api.exception_handler(Unavailable)
    async def unavailable(_: Request, exc: Unavailable) -> JSONResponse:
        return error_response(503, exc.code, exc.message, {"Retry-After": str(exc.retry_after_s)})

    @api.exception_handler(FilterError)
    async def bad_filter(_: Request, exc: FilterError) -> JSONResponse:
        return error_response(422, "invalid_filter", str(exc))

    @api.exception_handler(ConfigError)
    async def bad_options(_: Request, exc: ConfigError) -> JSONResponse:
        return error_response(422, "invalid_options", str(exc))

    @api.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'] if part != 'body') or 'body'}: {error['msg']}"
            for error in exc.errors()
        )
        return error_response(422, "invalid_request", problems)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @api.exception_handler(StoreError)
    @api.exception_handler(RetrievalError)
    async def index_unavailable(_: Request, exc: Exception) -> JSONResponse:
        return error_response(503, "index_unavailable", str(exc))

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "the server failed on this request; its log has the details")

    async def checked_filters(request: SearchRequest) -> None:
        """Reject unknown fields and malformed operands (a 422 naming the known fields) before any work."""
        if request.filters:
            fields = await to_thread.run_sync(ragline.store.filter_fields)
            check_filters(request.filters, fields)

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness, answered while models load and answers generate; `answers_in_flight` counts the answers
        generating or waiting for a turn."""
        chunks = None
        if ready.components["store"].status == "ready":
            chunks = await to_thread.run_sync(ragline.store.count)
        return {
            "status": "ok",
            "version": __version__,
            "chunks": chunks,
            "embedder": settings.embedder.model,
            "answers_in_flight": queue.admitted,
        }

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        """Each component loading, ready or failed (with why); 503 until the API can answer."""
        report = ready.report()
        status = 200 if report["status"] in ("ready", "degraded") else 503
        headers = {"Retry-After": str(serve.busy_retry_after_s)} if status == 503 else None
        return JSONResponse(report, status_code=status, headers=headers)

    def options(request: SearchRequest) -> RetrieveSettings | None:
        """The request's retrieval options over the config's (a 422 naming the bad option)."""
        return retrieve_options(settings.retrieve, request.options) if request.options else None

    @api.post("/v1/search", response_model=SearchResponse)
    async def search(request: SearchRequest) -> dict[str, Any]:
        ready.require("store", "embedder")
        wanted = options(request)
        await checked_filters(request)
        result = await to_thread.run_sync(
            lambda: ragline.retriever.search(request.query, request.k, request.filters, wanted, request.turns())
        )
        return {
            "query": result.query, "hits": [hit.to_dict() for hit in result.hits], "timings": result.timings,
            "notes": result.notes,
        }

    async def admitted(request: SearchRequest) -> tuple[Admission, RetrieveSettings | None]:
        """Checks that need no generation slot, then a place in the generation queue (or a 503 at once)."""
        ready.require("store", "embedder", "llm")
        wanted = options(request)
        await checked_filters(request)
        return queue.admit(), wanted

    @api.post("/v1/query")
    async def query(request: SearchRequest) -> dict[str, Any]:
        """The cited answer, when it is complete (same JSON as `ragline ask --json`, plus latency_ms)."""
        started = time.perf_counter()
        final: dict[str, Any] = {}
        admission, wanted = await admitted(request)
        async with admission:
            async for event in ragline.aask(request.query, request.k, request.filters, wanted, request.turns()):
                if isinstance(event, AnswerEvent):
                    final = _public(event.answer.to_dict())
        return {**final, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}

    @api.post("/v1/query/stream")
    async def query_stream(request: SearchRequest) -> StreamingResponse:
        """NDJSON events: `queued` when waiting for a turn, `status` per stage, `token` pieces, each `claim`
        checked as soon as it is complete, then the final `answer` (or an `error` with `code` and `message`)."""
        admission, wanted = await admitted(request)

        async def lines() -> AsyncGenerator[str, None]:
            try:
                if admission.must_wait:
                    yield json.dumps({"type": "status", "stage": "queued"}) + "\n"
                async with admission:
                    async for event in ragline.aask(request.query, request.k, request.filters, wanted, request.turns()):
                        yield json.dumps(_public(event.to_dict())) + "\n"
            except (RetrievalError, StoreError) as exc:
                yield json.dumps(_error_event("index_unavailable", str(exc))) + "\n"
            except Exception as exc:  # the status line has gone out: report in the stream, log the rest
                log.error("streamed query failed", exc_info=exc)
                yield json.dumps(_error_event("internal_error", "the server failed on this request")) + "\n"

        return _AnswerStream(lines(), admission)

    return api
