"""What every route shares: who is calling, how much they may ask, and the flow of one answer.

The answer flow is scoped from the first step: the caller's `Scope` goes into
every store query, and the cache keys carry the tenant, the groups and the
index version, so neither a search nor a cached answer can hand one caller
what only another may read. A changed index (an upload, a delete, a PATCH of
groups) changes the version, so no cached answer outlives what it was built
from.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPBearer

from ragline.config import RateSettings, RetrieveSettings, Settings
from ragline.embed.base import EmbedderError
from ragline.retrieve.retriever import RetrievalError
from ragline.serve.cache import answer_key, cache_namespace
from ragline.serve.identity import Principal
from ragline.serve.observability import StageSpans, stage
from ragline.serve.readiness import GenerationQueue, Readiness, Unavailable, without_host_paths
from ragline.store.base import StoreError
from ragline.types import AnswerEvent, StatusEvent

if TYPE_CHECKING:
    from ragline.app import Ragline
    from ragline.serve.cache import AnswerCache
    from ragline.serve.db import ChatMessage, Database
    from ragline.serve.identity import Authenticator
    from ragline.serve.jobs import JobRunner
    from ragline.serve.limits import RateLimiter
    from ragline.serve.observability import Metrics

log = logging.getLogger(__name__)

DB_TIMEOUT_S = 5.0
"""The longest a request waits on the service database before answering 503."""
T = TypeVar("T")


class ApiError(Exception):
    """A refusal with its HTTP status, becoming `{"code", "message"}`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def rate_limited(limit: str, retry_after_s: float) -> ApiError:
    wait = max(1, math.ceil(retry_after_s))
    return ApiError(429, "rate_limited", f"too many requests for this {limit}; retry in {wait} s", {"Retry-After": str(wait)})


def not_found(what: str) -> ApiError:
    """The same answer for what does not exist and what the caller may not see: nothing leaks."""
    return ApiError(404, "not_found", f"no {what} with that id")


def public_url(url: str) -> str:
    """A citation URL fit for clients: a local file's URL becomes its file name (no host path)."""
    if not url.startswith("file:"):
        return url
    path, _, anchor = url.partition("#")
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return f"{name}#{anchor}" if anchor else name


def public_hit(hit: dict[str, Any]) -> dict[str, Any]:
    return {**hit, "url": public_url(hit.get("url", ""))}


def public_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer as clients see it: notes may quote errors that name host paths, URLs may be local files."""
    return {
        **answer,
        "note": without_host_paths(answer.get("note") or ""),
        "hits": [public_hit(hit) for hit in answer.get("hits", [])],
        "citations": [{**c, "url": public_url(c.get("url", ""))} for c in answer.get("citations", [])],
    }


def trim_history(messages: Sequence[ChatMessage], budget: int, count: Any) -> list[dict[str, str]]:
    """The most recent turns that fit in `budget` tokens, oldest first (a follow-up needs the latest ones)."""
    kept: list[dict[str, str]] = []
    used = 0
    for message in reversed(messages):
        cost = count(message.content)
        if used + cost > budget:
            break
        used += cost
        kept.append({"role": message.role, "content": message.content})
    return kept[::-1]


@dataclass
class Service:
    ragline: Ragline
    settings: Settings
    db: Database
    cache: AnswerCache
    limiter: RateLimiter
    authenticator: Authenticator
    metrics: Metrics
    readiness: Readiness
    queue: GenerationQueue
    runner: JobRunner
    migrated: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the service database's schema is up to date."""

    @classmethod
    def build(cls, ragline: Ragline, readiness: Readiness) -> Service:
        """The service over the composition root's parts (the API's, or `ragline cache warm`'s)."""
        serve = ragline.settings.serve
        return cls(
            ragline=ragline, settings=ragline.settings, db=ragline.database, cache=ragline.answer_cache,
            limiter=ragline.rate_limiter, authenticator=ragline.authenticator, metrics=ragline.metrics,
            readiness=readiness, runner=ragline.job_runner,
            queue=GenerationQueue(serve.max_concurrent_generations, serve.max_queued_generations, serve.busy_retry_after_s),
        )

    # --- the caller ------------------------------------------------------------------------------

    async def caller(self, request: Request, authorization: str | None, api_key: str | None) -> Principal:
        """Authenticate the request and charge it to its address and its key (429 beyond their limits)."""
        if not self.migrated.is_set() and self.settings.serve.auth.enabled:
            raise Unavailable("database_unavailable", "the service database is not ready yet; retry shortly", 5)
        limits = self.settings.serve.rate_limits
        route = request.scope.get("route")
        path = getattr(route, "path", request.url.path)
        if limits.enabled:
            address = request.client.host if request.client else "unknown"
            await self._charge(f"ip:{address}", limits.per_ip, "address")
        principal = await self.database(self.authenticator.authenticate(authorization, api_key), "API keys")
        if limits.enabled:
            await self._charge(
                f"key:{principal.tenant}:{principal.subject}:{path}" if path in limits.routes else
                f"key:{principal.tenant}:{principal.subject}",
                limits.routes.get(path, limits.per_key), "key",
            )
        request.state.principal = principal
        return principal

    async def _charge(self, key: str, rate: RateSettings, limit: str) -> None:
        decision = await self.limiter.take(key, rate)
        if not decision.allowed:
            self.metrics.rate_limited.labels(limit=limit).inc()
            raise rate_limited(limit, decision.retry_after_s)

    async def database(self, call: Awaitable[T], what: str) -> T:
        """A service-database call under its deadline; a 503 when the database is down or slow."""
        try:
            async with asyncio.timeout(DB_TIMEOUT_S):
                return await call
        except (TimeoutError, OSError, ConnectionError) as exc:
            raise Unavailable("database_unavailable", f"the service database did not answer ({what})", 5) from exc
        except Exception as exc:
            if type(exc).__module__.startswith(("sqlalchemy", "asyncpg", "sqlite3", "aiosqlite")):
                log.warning("service database failed: %s", what, exc_info=True)
                raise Unavailable("database_unavailable", f"the service database failed ({what})", 5) from exc
            raise

    def check_question(self, text: str, k: int | None) -> None:
        """The limits of serve.limits (a 422 with what is allowed)."""
        limits = self.settings.serve.limits
        if not text.strip():
            raise ApiError(422, "invalid_request", "the question is empty: send some text")
        if len(text) > limits.max_query_chars:
            raise ApiError(
                422, "invalid_request",
                f"the question is {len(text)} characters; at most {limits.max_query_chars} are accepted",
            )
        if k is not None and k > limits.max_k:
            raise ApiError(422, "invalid_request", f"k is {k}; at most {limits.max_k} passages are returned (serve.limits.max_k)")

    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.admin:
            raise ApiError(403, "forbidden", "this needs an admin key or token of the tenant")

    # --- answers ---------------------------------------------------------------------------------

    def fingerprint(self, k: int | None, filters: dict[str, Any] | None, options: RetrieveSettings | None) -> str:
        """What besides the question and the index decides an answer."""
        parts = [
            self.settings.generate.model_dump(mode="json"),
            (options or self.settings.retrieve).model_dump(mode="json"),
            k, filters,
        ]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    async def answer_events(
        self,
        question: str,
        principal: Principal,
        *,
        k: int | None,
        filters: dict[str, Any] | None,
        options: RetrieveSettings | None,
        history: list[dict[str, str]] | None = None,
        session_id: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one answer as wire dicts, the last an `answer` (with `answer_id`) or an `error`.

        A question asked before by someone with the same scope (exactly, or
        worded closely enough) is answered from the cache; follow-ups in a
        conversation are not, since their history changes their meaning.
        """
        started = time.perf_counter()
        scope = principal.scope
        cache = self.settings.serve.cache
        key = namespace = vector = None
        final: dict[str, Any] | None = None
        if cache.enabled and not history:
            with stage("cache", self.metrics, tenant=scope.tenant):
                version = await to_thread.run_sync(self.ragline.store.index_version)
                fingerprint = self.fingerprint(k, filters, options)
                key = answer_key(question, scope, version, fingerprint)
                final = await self.cache.get(key)
                self.metrics.cache_lookups.labels(kind="exact", result="hit" if final else "miss").inc()
                if final is None and cache.semantic:
                    namespace = cache_namespace(scope, version, fingerprint)
                    try:
                        vector = await to_thread.run_sync(lambda: self.ragline.embedder.embed_queries([question])[0])
                    except EmbedderError as exc:  # no semantic cache while the embedding service is down
                        log.warning("semantic cache skipped: %s", exc)
                    else:
                        final = await self.cache.nearest(namespace, vector, cache.semantic_threshold)
                        self.metrics.cache_lookups.labels(kind="semantic", result="hit" if final else "miss").inc()
            if final is not None:
                yield {"type": "status", "stage": "cache"}
                final = {**final, "cached": True}
        if final is None:
            async with aclosing(self._generate(question, scope, k, filters, options, history)) as events:
                async for event in events:
                    if event["type"] == "answer":
                        final = event
                    else:
                        yield event
            if final is None:
                return
            final = {**public_answer(final), "cached": False}
            self._observe(final)
            final["answer_id"] = await self._record(principal, question, final, session_id)
            if key is not None and not final["note"]:
                stored = {name: value for name, value in final.items() if name not in ("type", "cached")}
                await self.cache.put(key, stored, cache.ttl_s)
                if namespace is not None and vector is not None:
                    await self.cache.remember(namespace, vector, stored, cache.ttl_s, cache.max_semantic_entries)
        # a cached answer keeps the id it was recorded under (feedback on it is feedback on that answer)
        yield {**final, "type": "answer", "latency_ms": round((time.perf_counter() - started) * 1000, 1)}

    async def _generate(
        self, question: str, scope: Any, k: int | None, filters: dict[str, Any] | None,
        options: RetrieveSettings | None, history: list[dict[str, str]] | None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Retrieval and generation under a place in the generation queue and the request's deadline.

        The deadline bounds each wait (for a turn, for the next event), never a `yield`: a timeout spanning
        a yield would fire in the consumer's frame and cancel the whole response instead of ending it.
        """
        timeout = self.settings.serve.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        admission = self.queue.admit()
        self._queue_depth()
        events = self.ragline.aask(question, k, filters, options, history, scope=scope)
        spans = StageSpans()
        try:
            if admission.must_wait:
                yield {"type": "status", "stage": "queued"}
            async with asyncio.timeout_at(deadline):
                await admission.__aenter__()
            while True:
                async with asyncio.timeout_at(deadline):
                    event = await anext(events, None)
                if event is None:
                    return
                if isinstance(event, StatusEvent):  # a stage begins: its span runs until the next one's
                    spans.begin(event.stage)
                yield {"type": "answer", **event.answer.to_dict()} if isinstance(event, AnswerEvent) else event.to_dict()
        except TimeoutError:
            yield error_event("timeout", f"no answer within {timeout:g} s (serve.request_timeout_s)")
        except (RetrievalError, StoreError) as exc:
            yield error_event("index_unavailable", str(exc))
        finally:
            spans.end()
            await events.aclose()
            admission.release()
            self._queue_depth()

    def _queue_depth(self) -> None:
        self.metrics.queue_depth.labels(queue="generation").set(self.queue.admitted)

    def _observe(self, answer: dict[str, Any]) -> None:
        for name, ms in answer.get("timings", {}).items():
            self.metrics.stage_seconds.labels(stage=name).observe(ms / 1000)
        for kind in ("prompt", "completion"):
            tokens = answer.get("usage", {}).get(f"{kind}_tokens")
            if tokens:
                self.metrics.tokens.labels(model=answer.get("model", ""), kind=kind).inc(tokens)

    async def _record(
        self, principal: Principal, question: str, answer: dict[str, Any], session_id: str | None
    ) -> str | None:
        """Keep the answer for feedback; an answer is still given when the database cannot take it."""
        stored = {name: value for name, value in answer.items() if name not in ("type", "latency_ms")}
        try:
            async with asyncio.timeout(DB_TIMEOUT_S):
                return await self.db.answers.record(principal.tenant, principal.subject, question, stored, session_id)
        except Exception:
            log.warning("could not record an answer", exc_info=True)
            return None

    async def count_tokens(self, texts: list[str]) -> list[int]:
        tokenizer = await to_thread.run_sync(lambda: self.ragline.embedder.tokenizer)
        return [len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts]


bearer = HTTPBearer(auto_error=False, description="an API key (rl_…) or a JWT")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key (rl_…)")


async def caller(
    request: Request, _bearer: Annotated[Any, Depends(bearer)], key: Annotated[str | None, Depends(api_key_header)]
) -> Principal:
    """The authenticated caller of a `/v1` route (a FastAPI dependency; the schemes show in the OpenAPI docs)."""
    service: Service = request.app.state.service
    return await service.caller(request, request.headers.get("authorization"), key)


Caller = Annotated[Principal, Depends(caller)]


def error_event(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": without_host_paths(message)}


async def final_answer(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The last event of an answer stream (the answer, or an error)."""
    final: dict[str, Any] = {}
    async for event in events:
        if event["type"] in ("answer", "error"):
            final = event
    return final
