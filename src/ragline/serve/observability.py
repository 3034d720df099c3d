"""Metrics, JSON logs, traces and request ids for the service.

Prometheus metrics live on a registry of their own, so that several apps in one
process (tests) never collide. Under `ragline serve --workers N` the variable
PROMETHEUS_MULTIPROC_DIR names a folder every worker writes its samples to, and
`/metrics` from any worker adds them all up.

Every request gets an id (the client's `X-Request-ID` when it is a sane token),
which the response carries back and every log line of the request includes.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import prometheus_client
from opentelemetry import trace
from opentelemetry.trace import Span
from prometheus_client import multiprocess
from prometheus_client import values as prometheus_values
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragline.config import TelemetrySettings

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
REQUEST_ID_HEADER = "X-Request-ID"
UNMATCHED_ROUTE = "unmatched"
"""The route label of a request no route matched: random paths must not mint new series."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_request_id: ContextVar[str | None] = ContextVar("ragline_request_id", default=None)
_tracer = trace.get_tracer("ragline")
access_log = logging.getLogger("ragline.access")


def request_id() -> str | None:
    """The id of the request being served, None outside a request."""
    return _request_id.get()


class MetricsConfigError(RuntimeError):
    """The multi-process metrics folder is unusable; the message says how to fix it."""


class Metrics:
    """The service's Prometheus metrics.

    Single process: a private CollectorRegistry. Multi-process (PROMETHEUS_MULTIPROC_DIR set): samples go
    to per-process files in that folder, the metrics are registered nowhere (the files are the truth; a
    registry would export this process's samples twice), and `render` sums every process's files.
    """

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR_VARIABLE) or None
        registry: prometheus_client.CollectorRegistry | None = None
        if self.multiprocess_dir is None:
            registry = prometheus_client.CollectorRegistry()
        else:
            _check_multiprocess_dir(self.multiprocess_dir)
            # A live-mode gauge of an exited worker must stop counting; the file of a crashed one stays.
            atexit.register(multiprocess.mark_process_dead, os.getpid(), self.multiprocess_dir)
        self.registry = registry
        self.requests = prometheus_client.Counter(
            "ragline_requests", "HTTP requests by route template", ["route", "method", "status"], registry=registry
        )
        self.request_seconds = prometheus_client.Histogram(
            "ragline_request_seconds",
            "HTTP request duration; a stream until its last chunk",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = prometheus_client.Histogram(
            "ragline_stage_seconds",
            "duration of one pipeline stage (retrieve, rerank, generate, verify, cache)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = prometheus_client.Counter(
            "ragline_tokens", "LLM tokens by model and kind (prompt|completion)", ["model", "kind"], registry=registry
        )
        self.cache_lookups = prometheus_client.Counter(
            "ragline_cache_lookups",
            "answer cache lookups by kind (exact|semantic) and result (hit|miss)",
            ["kind", "result"],
            registry=registry,
        )
        self.ingest_documents = prometheus_client.Counter(
            "ragline_ingest_documents",
            "documents ingested by outcome (new|changed|deleted|failed|unchanged)",
            ["outcome"],
            registry=registry,
        )
        self.queue_depth = prometheus_client.Gauge(
            "ragline_queue_depth",
            "items waiting in a queue, summed over the live worker processes",
            ["queue"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.rate_limited = prometheus_client.Counter(
            "ragline_rate_limited", "requests refused by a rate limit (key|ip)", ["limit"], registry=registry
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type: this process's metrics, or every worker's."""
        if self.registry is not None:
            return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_LATEST
        aggregate = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(aggregate, path=self.multiprocess_dir)
        return prometheus_client.generate_latest(aggregate), prometheus_client.CONTENT_TYPE_LATEST


def _check_multiprocess_dir(path: str) -> None:
    """Multi-process samples need the folder, and the variable set before prometheus_client was imported."""
    if not os.path.isdir(path):
        raise MetricsConfigError(
            f"{MULTIPROC_DIR_VARIABLE}={path} is not a folder: create it (empty) before the workers start"
        )
    if prometheus_values.ValueClass is prometheus_values.MutexValue:
        raise MetricsConfigError(
            f"{MULTIPROC_DIR_VARIABLE} was set after prometheus_client was imported, so this process keeps its "
            "samples in memory and the other workers would never see them: set the variable before importing "
            "ragline.serve, or start the workers as fresh processes with it in their environment"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the request id, and `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        current_request = _request_id.get()
        if current_request is not None:
            entry["request_id"] = current_request
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """Plain lines for a terminal, still with the request id."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        current_request = _request_id.get()
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{name}={value}" for name, value in fields.items())
        return f"{line} request_id={current_request}" if current_request else line


class _RaglineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging installed, so a second call replaces it instead of adding one."""


def configure_logging(json_logs: bool, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr), as JSON lines or plain text. Calling it again reconfigures."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _RaglineHandler)]:
        root.removeHandler(handler)
    handler = _RaglineHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else _TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())


_configured_tracing: tuple[tuple[str, str | None, str], trace.TracerProvider] | None = None


def configure_tracing(settings: TelemetrySettings, service_name: str = "ragline") -> trace.TracerProvider | None:
    """Install the process's OpenTelemetry tracer provider; None (spans are no-ops) when traces are "none".

    OpenTelemetry takes one provider per process, so a second call with the same settings returns the
    first provider and one with other settings is refused. Call it in each worker process, after it
    started: the exporter's thread does not survive a fork.
    """
    global _configured_tracing
    if settings.traces == "none":
        return None
    wanted = (settings.traces, settings.otlp_endpoint, service_name)
    if _configured_tracing is not None:
        configured, provider = _configured_tracing
        if configured != wanted:
            raise RuntimeError(
                f"tracing is already configured as {configured} in this process and OpenTelemetry cannot "
                f"replace it with {wanted}: configure tracing once per process"
            )
        return provider

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if settings.traces == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # No endpoint: the exporter reads OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else http://localhost:4318/v1/traces.
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint) if settings.otlp_endpoint else OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        raise RuntimeError(
            "another tracer provider was installed in this process before configure_tracing: "
            "remove that setup or let configure_tracing be the only one"
        )
    _configured_tracing = (wanted, provider)
    return provider


@contextmanager
def stage(name: str, metrics: Metrics | None, **attributes: Any) -> Iterator[Span]:
    """Time one pipeline stage: a span `ragline.<name>` and an observation of stage_seconds{stage=name}.

    Plain `with`: it works in a coroutine (the span is current in that task) and in a worker thread started
    with `asyncio.to_thread`/`anyio.to_thread`, which copy the context, so the span nests under the request's.
    An exception is recorded on the span and the duration is observed all the same.
    """
    started = time.perf_counter()
    span_attributes = {key: value for key, value in attributes.items() if value is not None}
    try:
        with _tracer.start_as_current_span(f"ragline.{name}", attributes=span_attributes) as span:
            yield span
    finally:
        if metrics is not None:
            metrics.stage_seconds.labels(stage=name).observe(time.perf_counter() - started)


def _incoming_request_id(scope: Scope) -> str | None:
    """The client's X-Request-ID when it is a short token; anything else could forge or break log lines."""
    for header, value in scope.get("headers", ()):
        if header == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _SANE_REQUEST_ID.fullmatch(candidate) else None
    return None


def _route_template(scope: Scope) -> str:
    """The matched route's template ("/v1/documents/{doc_id}"), never the raw path."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) and template else UNMATCHED_ROUTE


class RequestContextMiddleware:
    """Request id, access log and request metrics, as plain ASGI so streamed bodies pass through unbuffered.

    The request is counted when its last body chunk is sent (a stream: when it ends), or when the app
    fails or the client leaves (the status sent so far, 500 if none was).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        current_request = _incoming_request_id(scope) or uuid.uuid4().hex
        token = _request_id.set(current_request)
        started = time.perf_counter()
        status: int | None = None
        recorded = False

        def record(final_status: int) -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            self.metrics.requests.labels(route=route, method=scope["method"], status=str(final_status)).inc()
            self.metrics.request_seconds.labels(route=route).observe(elapsed)
            client = scope.get("client")
            access_log.info(
                "%s %s %d",
                scope["method"],
                route,
                final_status,
                extra={
                    "fields": {
                        "method": scope["method"],
                        "route": route,
                        "path": scope.get("path", ""),
                        "status": final_status,
                        "ms": round(elapsed * 1000, 1),
                        "request_id": current_request,
                        "client": client[0] if client else None,
                    }
                },
            )

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, current_request)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record(status if status is not None else 500)

        failed = False
        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            failed = True
            raise
        finally:
            record(500 if failed or status is None else status)
            _request_id.reset(token)


class StageSpans:
    """Spans of consecutive stages announced as they begin (an answer's retrieve, then generate): each
    one ends when the next begins, the last at `end()`."""

    def __init__(self) -> None:
        self._span: Span | None = None

    def begin(self, name: str) -> None:
        self.end()
        self._span = trace.get_tracer("ragline").start_span(f"ragline.{name}")

    def end(self) -> None:
        if self._span is not None:
            self._span.end()
            self._span = None
