"""The FastAPI application factory: the multi-tenant service under `/v1`.

Every `/v1` route authenticates its caller (an API key or a JWT; anonymous
admin of the default tenant when `serve.auth.enabled` is off), charges it to
its key and address (429 with `Retry-After` beyond the limits), and reads
only what the caller's scope allows: the scope goes into every store query.

Handlers are async and never block the event loop: embedding, search and
database work run in worker threads or async drivers, generation streams
from one, and the models load at startup in a thread while `/readyz`
reports their state. Answers are generated under a bounded queue: beyond it
a 503 with `Retry-After`. A client that leaves mid-stream cancels its
generation. Answers stream as NDJSON or server-sent events by `Accept`.

Every error is JSON `{"code", "message"}` with no stack trace and no host path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragline import __version__
from ragline.app import Ragline
from ragline.config import ConfigError, RetrieveSettings, Settings, load_settings, retrieve_options
from ragline.retrieve.retriever import RetrievalError
from ragline.serve.documents import documents_router
from ragline.serve.identity import AuthError, Principal
from ragline.serve.jobs import UploadError
from ragline.serve.models import (
    AnswerOut,
    ChatRequest,
    CompletionOut,
    CompletionRequest,
    ErrorOut,
    PageLimit,
    PageOffset,
    SearchRequest,
    SearchResponse,
    SessionDetail,
    SessionOut,
)
from ragline.serve.observability import RequestContextMiddleware, configure_logging, configure_tracing, stage
from ragline.serve.readiness import Readiness, Unavailable, without_host_paths
from ragline.serve.service import (
    ApiError,
    Caller,
    Service,
    error_event,
    final_answer,
    not_found,
    public_hit,
    trim_history,
)
from ragline.store.base import FilterError, StoreError, check_filters

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
PING_TIMEOUT_S = 2.0
UPLOAD_SLACK = 1 << 20
PRUNE_EVERY_S = 3600.0
"""How often a server deletes finished jobs and answers past their retention."""
"""Bytes a multipart upload may carry beyond the file itself (boundaries, form fields)."""
ERRORS = {status: {"model": ErrorOut} for status in (401, 403, 404, 413, 422, 429, 503)}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": without_host_paths(message)}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies over the limits (413) before the app reads them all: by Content-Length when
    given, else as the bytes arrive. Uploads have their own, larger limit."""

    def __init__(self, app: ASGIApp, max_body: int, max_upload: int) -> None:
        self.app = app
        self.max_body = max_body
        self.max_upload = max_upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        upload = scope["path"] == "/v1/documents"
        limit = self.max_upload + UPLOAD_SLACK if upload else self.max_body
        what = "upload (serve.limits.max_upload_mb)" if upload else "request body (serve.limits.max_body_mb)"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, what, limit)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send, what, limit)

    @staticmethod
    async def _refuse(send: Send, what: str, limit: int) -> None:
        response = error_response(413, "too_large", f"the {what} is over its limit of {limit / 1048576:g} MB")
        await response({"type": "http"}, _no_body, send)


class _TooLarge(Exception):
    pass


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class _EventStream(StreamingResponse):
    """A stream that stops generating when the client leaves and always closes its events (freeing the
    generation queue place): Starlette cancels the body on disconnect; closing here covers the rest."""

    def __init__(self, lines: AsyncGenerator[str, None], media_type: str, headers: dict[str, str] | None = None):
        super().__init__(lines, media_type=media_type, headers=headers)
        self._lines = lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._lines.aclose()


def wants(request: Request) -> str:
    accept = request.headers.get("accept", "")
    if SSE in accept:
        return SSE
    return NDJSON if NDJSON in accept else "application/json"


def _line(event: dict[str, Any], media_type: str) -> str:
    if media_type == SSE:
        return f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n"
    return json.dumps(event) + "\n"


ERROR_STATUS = {"timeout": 504, "index_unavailable": 503, "internal_error": 500}


async def respond(events: AsyncGenerator[dict[str, Any], None], media_type: str) -> Response:
    """The answer as JSON (when complete), or streamed as NDJSON or SSE.

    The first event is awaited before the response starts, so a full queue
    or a missing component is still a proper 503, not an error mid-stream.
    """
    if media_type == "application/json":
        final = await final_answer(events)
        if final.get("type") == "error":
            return error_response(ERROR_STATUS.get(final["code"], 503), final["code"], final["message"])
        return JSONResponse({name: value for name, value in final.items() if name != "type"})
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise

    async def lines() -> AsyncGenerator[str, None]:
        try:
            if first is not None:
                yield _line(first, media_type)
            async for event in events:
                yield _line(event, media_type)
        except Exception as exc:  # the status line has gone out: report in the stream, log the rest
            log.error("streamed answer failed", exc_info=exc)
            yield _line(error_event("internal_error", "the server failed on this request"), media_type)
        finally:
            await events.aclose()

    return _EventStream(lines(), media_type, {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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


async def _ping(check: Any) -> dict[str, str]:
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            await check()
    except Exception as exc:
        return {"status": "failed", "reason": without_host_paths(str(exc) or type(exc).__name__)[:300]}
    return {"status": "ready"}


def create_app(settings: Settings, components: Ragline | None = None) -> FastAPI:
    """Build the API over the components of the composition root (built from `settings` if not given;
    given components bring their own settings)."""
    ragline = components or Ragline(settings)
    settings = ragline.settings
    serve = settings.serve
    names = ["store", "embedder", "llm"]
    if settings.generate.router.enabled:
        names.append("cheap_llm")
    ready = Readiness(names, retry_after_s=serve.busy_retry_after_s)
    service = Service.build(ragline, ready)
    metrics = service.metrics
    configure_logging(serve.telemetry.json_logs)
    configure_tracing(serve.telemetry)  # here, in each worker process: exporter threads do not survive a fork
    migrated = service.migrated
    migration_error = ""
    background: list[asyncio.Task[None]] = []

    async def migrate_until_done() -> None:
        """Bring the service database up to date, retrying while it is down (/readyz says so meanwhile)."""
        nonlocal migration_error
        while True:
            try:
                await service.db.migrate()
            except Exception as exc:
                migration_error = without_host_paths(str(exc) or type(exc).__name__)[:300]
                log.warning("the service database is not reachable; retrying in 5 s", exc_info=True)
                await asyncio.sleep(5)
                continue
            migrated.set()
            service.runner.start()
            background.append(asyncio.create_task(prune_forever(), name="ragline-retention"))
            return

    async def prune_forever() -> None:
        """Delete finished jobs and recorded answers past their retention (serve.*_retention_days), hourly."""
        while True:
            try:
                pruned = await service.db.prune(serve.job_retention_days, serve.answer_retention_days)
                if any(pruned.values()):
                    log.info("deleted what was past its retention: %s", pruned)
            except Exception:  # the database is down: /readyz says so; the next round tries again
                log.warning("could not delete expired jobs and answers", exc_info=True)
            await asyncio.sleep(PRUNE_EVERY_S)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(to_thread.run_sync(_load_components, ragline, ready, abandon_on_cancel=True))
        migrating = asyncio.create_task(migrate_until_done())
        try:
            yield
        finally:
            loading.cancel()
            migrating.cancel()
            for task in background:
                task.cancel()
            await service.runner.stop()
            for close in (service.cache.close, service.limiter.close, service.db.close):
                try:
                    await close()
                except Exception:
                    log.warning("closing a service client failed", exc_info=True)
            ragline.close()

    api = FastAPI(
        title="Ragline", version=__version__, lifespan=lifespan,
        description="Answers with verified citations from your documents, scoped to what each caller may read.",
    )
    api.state.service = service
    api.add_middleware(BodyLimit, max_body=int(serve.limits.max_body_mb * 1048576),
                       max_upload=int(serve.limits.max_upload_mb * 1048576))
    api.add_middleware(RequestContextMiddleware, metrics=metrics)

    @api.exception_handler(ApiError)
    async def refused(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @api.exception_handler(AuthError)
    async def unauthenticated(_: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, headers)

    @api.exception_handler(UploadError)
    async def bad_upload(_: Request, exc: UploadError) -> JSONResponse:
        return error_response(exc.status, exc.code, str(exc))

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

    @api.exception_handler(TimeoutError)
    async def timed_out(_: Request, exc: TimeoutError) -> JSONResponse:
        return error_response(504, "timeout", f"no result within {serve.request_timeout_s:g} s (serve.request_timeout_s)")

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "the server failed on this request; its log has the details")

    async def checked(request: SearchRequest | ChatRequest, text: str) -> RetrieveSettings | None:
        """Input limits, filters and options, checked before any work (422 naming the problem)."""
        service.check_question(text, request.k)
        if request.filters:
            fields = await to_thread.run_sync(ragline.store.filter_fields)
            check_filters(request.filters, fields)
        if not request.options:
            return None
        return retrieve_options(settings.retrieve, request.options, caller_may_set_servers=False)

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness, answered while models load and answers generate (no index content: no authentication)."""
        return {"status": "ok", "version": __version__, "answers_in_flight": service.queue.admitted}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        """Each component (store, embedder, LLM, database, Redis) loading, ready or failed, with why;
        503 until the API can answer. Redis down degrades (no caches, limits per process), it does not fail."""
        report = ready.report()
        components = report["components"]
        if migrated.is_set():
            components["database"] = await _ping(service.db.ping)
        elif migration_error:
            components["database"] = {"status": "failed", "reason": migration_error}
        else:
            components["database"] = {"status": "loading", "reason": "bringing the schema up to date"}
        if serve.redis_url:
            components["redis"] = await _ping(service.cache.ping)
        status = report["status"]
        if components["database"]["status"] != "ready":
            status = "failed" if components["database"]["status"] == "failed" else status
            status = "loading" if status == "ready" else status
        elif components.get("redis", {}).get("status") == "failed" and status == "ready":
            status = "degraded"
        code = 200 if status in ("ready", "degraded") else 503
        headers = {"Retry-After": str(serve.busy_retry_after_s)} if code == 503 else None
        return JSONResponse({"status": status, "components": components}, status_code=code, headers=headers)

    @api.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @api.post("/v1/search", response_model=SearchResponse, responses=ERRORS)
    async def search(principal: Caller, request: SearchRequest) -> dict[str, Any]:
        """The passages that best answer the query, among those the caller may read."""
        ready.require("store", "embedder")
        wanted = await checked(request, request.query)
        async with asyncio.timeout(serve.request_timeout_s):
            with stage("search", metrics, tenant=principal.tenant):
                result = await to_thread.run_sync(
                    lambda: ragline.retriever.search(
                        request.query, request.k, request.filters, wanted, request.turns(), scope=principal.scope
                    ),
                    abandon_on_cancel=True,  # the deadline answers now; the thread's result is dropped
                )
        return {
            "query": result.query, "hits": [public_hit(hit.to_dict()) for hit in result.hits],
            "timings": result.timings, "notes": [without_host_paths(note) for note in result.notes],
        }

    async def query_events(principal: Principal, request: SearchRequest) -> AsyncGenerator[dict[str, Any], None]:
        ready.require("store", "embedder", "llm")
        wanted = await checked(request, request.query)
        return service.answer_events(
            request.query, principal, k=request.k, filters=request.filters, options=wanted, history=request.turns()
        )

    answer_content = {
        200: {"model": AnswerOut, "content": {NDJSON: {}, SSE: {}}}, **ERRORS,
    }

    @api.post("/v1/query", response_model=AnswerOut, responses=answer_content)
    async def query(principal: Caller, request: SearchRequest, http: Request) -> Response:
        """A cited answer: JSON when complete, or streamed by `Accept` (NDJSON or SSE events: `status` per stage,
        `token` pieces, each `claim` checked as soon as it is complete, then the `answer`, or an `error`)."""
        return await respond(await query_events(principal, request), wants(http))

    @api.post("/v1/query/stream", responses=answer_content)
    async def query_stream(principal: Caller, request: SearchRequest) -> Response:
        """`/v1/query` streamed as NDJSON whatever the `Accept`."""
        return await respond(await query_events(principal, request), NDJSON)

    @api.post("/v1/chat", response_model=AnswerOut, responses=answer_content)
    async def chat(principal: Caller, request: ChatRequest, http: Request) -> Response:
        """A turn of a conversation kept in the service database: the follow-up is rewritten with the history
        (trimmed to serve.history_tokens) before retrieval. Streams like `/v1/query`; the first event names the
        session."""
        ready.require("store", "embedder", "llm")
        wanted = await checked(request, request.message)
        chats = service.db.chats
        if request.session_id:
            session = await service.database(
                chats.get_session(principal.tenant, principal.subject, request.session_id), "sessions"
            )
            if session is None:
                raise not_found("chat session")
            messages = await service.database(chats.messages(session.id), "sessions")
        else:
            title = " ".join(request.message.split())[:80]
            session = await service.database(chats.create_session(principal.tenant, principal.subject, title), "sessions")
            messages = []
        counts = await service.count_tokens([message.content for message in messages])
        sizes = dict(zip((message.content for message in messages), counts))
        history = trim_history(messages, serve.history_tokens, lambda text: sizes[text]) or None

        async def events() -> AsyncGenerator[dict[str, Any], None]:
            yield {"type": "session", "session_id": session.id}
            async for event in service.answer_events(
                request.message, principal, k=request.k, filters=request.filters, options=wanted,
                history=history, session_id=session.id,
            ):
                if event["type"] == "answer":
                    event = {**event, "session_id": session.id}
                    await service.database(chats.add_message(session.id, "user", request.message), "sessions")
                    await service.database(
                        chats.add_message(session.id, "assistant", event["answer"], event.get("answer_id")), "sessions"
                    )
                yield event

        return await respond(events(), wants(http))

    @api.get("/v1/chat/sessions", response_model=list[SessionOut], responses=ERRORS)
    async def sessions(principal: Caller, limit: PageLimit = 50, offset: PageOffset = 0) -> list[dict[str, Any]]:
        """The caller's own conversations, most recent first."""
        found = await service.database(
            service.db.chats.list_sessions(principal.tenant, principal.subject, limit, offset), "sessions"
        )
        return [session.to_dict() for session in found]

    @api.get("/v1/chat/sessions/{session_id}", response_model=SessionDetail, responses=ERRORS)
    async def session_detail(principal: Caller, session_id: str) -> dict[str, Any]:
        chats = service.db.chats
        session = await service.database(chats.get_session(principal.tenant, principal.subject, session_id), "sessions")
        if session is None:
            raise not_found("chat session")
        messages = await service.database(chats.messages(session.id), "sessions")
        return {**session.to_dict(), "messages": [message.to_dict() for message in messages]}

    @api.delete("/v1/chat/sessions/{session_id}", status_code=204, responses=ERRORS)
    async def delete_session(principal: Caller, session_id: str) -> None:
        deleted = await service.database(
            service.db.chats.delete_session(principal.tenant, principal.subject, session_id), "sessions"
        )
        if not deleted:
            raise not_found("chat session")

    @api.post("/v1/chat/completions", response_model=CompletionOut, responses=ERRORS)
    async def completions(principal: Caller, request: CompletionRequest) -> Response:
        """OpenAI-compatible: the last user message is the question, earlier turns its history; the answer
        cites the documents the caller may read (`citations` and `answer_id` are extra fields). With
        `stream: true`, chat.completion.chunk events and `data: [DONE]`; the draft streams as it is
        written, and the last chunk carries the verified answer (`answer`) when it differs."""
        ready.require("store", "embedder", "llm")
        turns = [m for m in request.messages if m.role in ("user", "assistant") and m.content]
        if not turns or turns[-1].role != "user":
            raise ApiError(422, "invalid_request", "the last message must be the user's question")
        question = turns[-1].content or ""
        service.check_question(question, None)
        history = [{"role": m.role, "content": m.content or ""} for m in turns[:-1]]
        counts = await service.count_tokens([turn["content"] for turn in history])
        budget, kept = serve.history_tokens, []
        for turn, tokens in zip(reversed(history), reversed(counts)):
            if tokens > budget:
                break
            budget -= tokens
            kept.append(turn)
        events = service.answer_events(question, principal, k=None, filters=None, options=None, history=kept[::-1] or None)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = request.model or "ragline"
        if not request.stream:
            final = await final_answer(events)
            if final.get("type") == "error":
                return error_response(ERROR_STATUS.get(final["code"], 503), final["code"], final["message"])
            usage = final.get("usage", {})
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": final["answer"]},
                             "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": usage.get("prompt_tokens", 0),
                    "completion_tokens": usage.get("completion_tokens", 0),
                    "total_tokens": usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0),
                },
                "citations": final["citations"], "answer_id": final.get("answer_id"),
            })

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {
                "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra,
            }
            return f"data: {json.dumps(body)}\n\n"

        stream = events
        first = await anext(stream)  # a full queue is a 503 here, before the stream starts

        async def lines() -> AsyncGenerator[str, None]:
            written = ""
            try:
                yield chunk({"role": "assistant", "content": ""})
                event: dict[str, Any] | None = first
                while event is not None:
                    if event["type"] == "token":
                        written += event["text"]
                        yield chunk({"content": event["text"]})
                    elif event["type"] == "answer":
                        extra: dict[str, Any] = {"citations": event["citations"], "answer_id": event.get("answer_id")}
                        if not written:
                            yield chunk({"content": event["answer"]})
                        elif written.strip() != event["answer"].strip():
                            extra["answer"] = event["answer"]
                        yield chunk({}, "stop", **extra)
                    elif event["type"] == "error":
                        yield f"data: {json.dumps({'error': {'code': event['code'], 'message': event['message']}})}\n\n"
                    event = await anext(stream, None)
                yield "data: [DONE]\n\n"
            finally:
                await stream.aclose()

        return _EventStream(lines(), SSE, {"Cache-Control": "no-cache"})

    api.include_router(documents_router(service))
    return api


def create_app_from_env() -> FastAPI:
    """The app of one `ragline serve --workers N` process: settings from the config file the CLI names."""
    config = os.environ.get("RAGLINE_CONFIG")
    return create_app(load_settings(Path(config) if config else None))
