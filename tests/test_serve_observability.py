"""Request ids, request metrics, JSON logs, traces and multi-process metrics of the service.

Tracing and multi-process metrics are per-process global state (one tracer provider per process; the
multi-process mode is chosen when prometheus_client is imported), so those tests run in subprocesses.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response, StreamingResponse
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from ragline.config import TelemetrySettings
from ragline.serve.observability import (
    Metrics,
    MetricsConfigError,
    RequestContextMiddleware,
    configure_logging,
    configure_tracing,
    request_id,
    stage,
)

DOCUMENT_ROUTE = "/v1/documents/{doc_id}"
SUBPROCESS_DEADLINE_S = 120
log = logging.getLogger("ragline.test_observability")


def build_app(metrics: Metrics) -> FastAPI:
    app = FastAPI()

    @app.get(DOCUMENT_ROUTE)
    async def document(doc_id: str) -> dict[str, str | None]:
        if doc_id == "missing":
            raise HTTPException(status_code=404, detail="no such document")
        log.info("looked up a document", extra={"fields": {"doc_id": doc_id}})
        return {"doc_id": doc_id, "request_id": request_id()}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("the handler fell over")

    @app.get("/metrics")
    async def exposition() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def client(metrics: Metrics) -> Iterator[TestClient]:
    with TestClient(build_app(metrics), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """JSON logs into a buffer; the root logger is put back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(json_logs=True, stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def requests_counted(metrics: Metrics, route: str, status: str, method: str = "GET") -> float:
    assert metrics.registry is not None
    value = metrics.registry.get_sample_value(
        "ragline_requests_total", {"route": route, "method": method, "status": status}
    )
    return value or 0.0


def test_a_request_id_is_generated_and_returned(client):
    response = client.get("/v1/documents/a")
    generated = response.headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert response.json()["request_id"] == generated
    assert client.get("/v1/documents/a").headers["X-Request-ID"] != generated


def test_a_sane_client_request_id_is_propagated(client):
    response = client.get("/v1/documents/a", headers={"X-Request-ID": "edge-7f.3_A"})
    assert response.headers["X-Request-ID"] == "edge-7f.3_A"
    assert response.json()["request_id"] == "edge-7f.3_A"


@pytest.mark.parametrize("hostile", [b"x" * 200, b"x" * 65, b"a b", b"../../etc/passwd", b"id\xe9", b""])
def test_a_hostile_request_id_is_replaced(client, hostile):
    response = client.get("/v1/documents/a", headers={"X-Request-ID": hostile})
    replaced = response.headers["X-Request-ID"]
    assert replaced.encode() != hostile and len(replaced) == 32
    assert response.json()["request_id"] == replaced


def test_a_request_id_with_a_newline_is_replaced(metrics, log_stream):
    """Header injection into the log: below the HTTP client, which would refuse to send it."""
    hostile = [(b"x-request-id", b"ok\nlevel=CRITICAL")]
    sent = asyncio.run(serve_once(build_app(metrics), http_scope("/v1/documents/a", hostile)))
    replaced = dict(sent[0]["headers"])[b"x-request-id"].decode()
    assert "\n" not in replaced and len(replaced) == 32
    assert "CRITICAL" not in log_stream.getvalue()


def test_requests_are_counted_by_route_template(client, metrics):
    for path in ("/v1/documents/a", "/v1/documents/b", "/v1/documents/missing"):
        client.get(path)
    assert requests_counted(metrics, DOCUMENT_ROUTE, "200") == 2
    assert requests_counted(metrics, DOCUMENT_ROUTE, "404") == 1, "a matched route keeps its template on a 404"
    assert metrics.registry.get_sample_value("ragline_request_seconds_count", {"route": DOCUMENT_ROUTE}) == 3


def test_unmatched_paths_share_one_label(client, metrics):
    for path in ("/random/1", "/random/2", "/wp-admin.php"):
        assert client.get(path).status_code == 404
    assert requests_counted(metrics, "unmatched", "404") == 3
    body = client.get("/metrics").text
    assert "/random" not in body and "wp-admin" not in body


def test_a_failing_handler_is_counted_as_500(client, metrics):
    assert client.get("/boom").status_code == 500
    assert requests_counted(metrics, "/boom", "500") == 1


def test_render_exposes_the_counters(client, metrics):
    client.get("/v1/documents/a")
    metrics.cache_lookups.labels(kind="semantic", result="hit").inc()
    metrics.tokens.labels(model="qwen", kind="completion").inc(42)
    metrics.rate_limited.labels(limit="ip").inc()
    metrics.ingest_documents.labels(outcome="changed").inc(3)
    metrics.queue_depth.labels(queue="generations").set(4)
    response = client.get("/metrics")
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    route_labels = (("method", "GET"), ("route", DOCUMENT_ROUTE), ("status", "200"))
    assert samples[("ragline_requests_total", route_labels)] == 1
    assert samples[("ragline_cache_lookups_total", (("kind", "semantic"), ("result", "hit")))] == 1
    assert samples[("ragline_tokens_total", (("kind", "completion"), ("model", "qwen")))] == 42
    assert samples[("ragline_rate_limited_total", (("limit", "ip"),))] == 1
    assert samples[("ragline_ingest_documents_total", (("outcome", "changed"),))] == 3
    assert samples[("ragline_queue_depth", (("queue", "generations"),))] == 4


def test_two_metrics_objects_do_not_collide():
    first, second = Metrics(), Metrics()
    first.rate_limited.labels(limit="key").inc()
    assert b'ragline_rate_limited_total{limit="key"} 1.0' in first.render()[0]
    assert b"ragline_rate_limited_total{" not in second.render()[0]


def test_json_log_lines_carry_the_request_id(client, log_stream):
    response = client.get("/v1/documents/a", headers={"X-Request-ID": "trace-me-1"})
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    handler_line = next(line for line in lines if line["message"] == "looked up a document")
    assert handler_line["request_id"] == "trace-me-1" and handler_line["doc_id"] == "a"
    assert handler_line["level"] == "INFO" and handler_line["logger"] == log.name and handler_line["time"]
    access = next(line for line in lines if line["logger"] == "ragline.access")
    assert access["request_id"] == response.headers["X-Request-ID"] == "trace-me-1"
    assert (access["method"], access["route"], access["path"], access["status"]) == (
        "GET", DOCUMENT_ROUTE, "/v1/documents/a", 200,
    )  # fmt: skip
    assert access["ms"] >= 0 and access["client"] == "testclient"


def test_logs_outside_a_request_have_no_request_id(log_stream):
    log.warning("between requests")
    line = json.loads(log_stream.getvalue())
    assert line["message"] == "between requests" and "request_id" not in line


def test_configure_logging_twice_does_not_duplicate_lines(log_stream):
    second = io.StringIO()
    configure_logging(json_logs=True, stream=second)
    log.info("once")
    assert log_stream.getvalue() == ""
    assert [json.loads(line)["message"] for line in second.getvalue().splitlines()] == ["once"]


def test_plain_text_logs_keep_the_request_id(client, log_stream):
    text = io.StringIO()
    configure_logging(json_logs=False, stream=text)
    client.get("/v1/documents/a", headers={"X-Request-ID": "plain-1"})
    handler_line = next(line for line in text.getvalue().splitlines() if "looked up a document" in line)
    assert "doc_id=a" in handler_line and "request_id=plain-1" in handler_line


def http_scope(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict:
    """The ASGI scope a server builds for a GET, for tests that must sit below any HTTP client."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers or [],
        "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
    }  # fmt: skip


async def serve_once(app, scope: dict) -> list[dict]:
    """Serve one bodiless request straight through ASGI; the messages the app sent."""
    sent: list[dict] = []
    request_read = False

    async def receive() -> dict:
        nonlocal request_read
        if request_read:
            raise AssertionError("the app waited for a disconnect after a plain response")
        request_read = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


def test_a_stream_is_not_buffered(metrics):
    """The first chunk reaches the server while the generator still waits; the request counts once it ends."""

    async def scenario() -> list[bytes]:
        release = asyncio.Event()
        first_chunk_sent = asyncio.Event()
        chunks: list[bytes] = []

        async def lines() -> AsyncIterator[bytes]:
            yield b"first\n"
            await asyncio.wait_for(release.wait(), 10)
            yield b"second\n"

        app = FastAPI()

        @app.get("/v1/stream")
        async def stream() -> StreamingResponse:
            return StreamingResponse(lines(), media_type="text/plain")

        served = RequestContextMiddleware(app, metrics)
        client_leaves = asyncio.Event()  # never set: this client stays to the end

        async def receive() -> dict:
            await asyncio.wait_for(client_leaves.wait(), 10)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                first_chunk_sent.set()

        serving = asyncio.create_task(served(http_scope("/v1/stream"), receive, send))
        await asyncio.wait_for(first_chunk_sent.wait(), 10)
        assert chunks == [b"first\n"], "the first chunk must pass while the generator is still waiting"
        assert requests_counted(metrics, "/v1/stream", "200") == 0, "a stream counts when it ends"
        release.set()
        await asyncio.wait_for(serving, 10)
        return chunks

    assert b"".join(asyncio.run(scenario())) == b"first\nsecond\n"
    assert requests_counted(metrics, "/v1/stream", "200") == 1


def test_stage_without_tracing_still_times_the_stage(metrics):
    assert configure_tracing(TelemetrySettings(traces="none")) is None
    with stage("rerank", metrics, candidates=20):
        pass
    with pytest.raises(ValueError, match="reranker broke"), stage("rerank", metrics):
        raise ValueError("reranker broke")
    assert metrics.registry.get_sample_value("ragline_stage_seconds_count", {"stage": "rerank"}) == 2


def run_python(code: str, env: dict[str, str] | None = None, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_DEADLINE_S,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


TRACING_SCRIPT = """
    import json, sys
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from ragline.config import TelemetrySettings
    from ragline.serve.observability import Metrics, configure_tracing, stage

    settings = TelemetrySettings(traces="console")
    provider = configure_tracing(settings)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    metrics = Metrics()
    with stage("answer", metrics):
        with stage("retrieve", metrics, k=5, mode="hybrid", tenant=None):
            pass
    try:
        with stage("generate", metrics, model="tiny"):
            raise ValueError("model fell over")
    except ValueError:
        pass
    provider.force_flush()
    try:
        configure_tracing(TelemetrySettings(traces="otlp", otlp_endpoint="http://127.0.0.1:9/v1/traces"))
        refused = ""
    except RuntimeError as error:
        refused = str(error)
    spans = {
        span.name: {
            "attributes": dict(span.attributes),
            "parent": span.parent.span_id if span.parent else None,
            "span_id": span.context.span_id,
            "status": span.status.status_code.name,
            "events": [event.name for event in span.events],
        }
        for span in memory.get_finished_spans()
    }
    print("RESULT " + json.dumps({
        "same_provider": configure_tracing(settings) is provider,
        "refused": refused,
        "spans": spans,
        "retrieve_observed": metrics.registry.get_sample_value("ragline_stage_seconds_count", {"stage": "retrieve"}),
    }))
"""


def test_console_tracing_emits_stage_spans():
    stdout = run_python(TRACING_SCRIPT)
    console, _, result_line = stdout.rpartition("RESULT ")
    result = json.loads(result_line)
    assert '"name": "ragline.retrieve"' in console, "the console exporter prints the span"
    spans = result["spans"]
    assert set(spans) == {"ragline.answer", "ragline.retrieve", "ragline.generate"}
    assert spans["ragline.retrieve"]["attributes"] == {"k": 5, "mode": "hybrid"}
    assert spans["ragline.retrieve"]["parent"] == spans["ragline.answer"]["span_id"]
    assert spans["ragline.generate"]["status"] == "ERROR" and spans["ragline.generate"]["events"] == ["exception"]
    assert result["retrieve_observed"] == 1
    assert result["same_provider"] is True
    assert "configure tracing once per process" in result["refused"]


OTLP_SCRIPT = """
    import json, threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from ragline.config import TelemetrySettings
    from ragline.serve.observability import configure_tracing, stage

    received = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}/v1/traces"
    provider = configure_tracing(TelemetrySettings(traces="otlp", otlp_endpoint=endpoint), service_name="ragline-test")
    with stage("retrieve", None, k=3):
        pass
    flushed = provider.force_flush(timeout_millis=10_000)
    server.shutdown()
    print(json.dumps({"flushed": flushed, "received": [
        {"path": path, "type": content_type, "has_span": b"ragline.retrieve" in body,
         "has_service": b"ragline-test" in body}
        for path, content_type, body in received
    ]}))
"""


def test_otlp_tracing_posts_spans_to_the_endpoint():
    result = json.loads(run_python(OTLP_SCRIPT))
    assert result["flushed"] is True
    assert result["received"] == [
        {"path": "/v1/traces", "type": "application/x-protobuf", "has_span": True, "has_service": True}
    ]


WORKER_SCRIPT = """
    import sys
    from ragline.serve.observability import Metrics

    metrics = Metrics()
    handled = int(sys.argv[1])
    for _ in range(handled):
        metrics.requests.labels(route="/v1/search", method="POST", status="200").inc()
    metrics.tokens.labels(model="tiny", kind="completion").inc(10 * handled)
    metrics.stage_seconds.labels(stage="retrieve").observe(0.2)
    metrics.queue_depth.labels(queue="generations").set(handled)
    if sys.argv[2] == "render":
        body, content_type = metrics.render()
        print(content_type)
        print(body.decode())
"""


def test_multiprocess_render_adds_up_every_worker(tmp_path):
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run_python(WORKER_SCRIPT, env, "2", "exit")
    content_type, _, body = run_python(WORKER_SCRIPT, env, "3", "render").partition("\n")
    assert content_type == CONTENT_TYPE_LATEST
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert samples[("ragline_requests_total", (("method", "POST"), ("route", "/v1/search"), ("status", "200")))] == 5
    assert samples[("ragline_tokens_total", (("kind", "completion"), ("model", "tiny")))] == 50
    assert samples[("ragline_stage_seconds_count", (("stage", "retrieve"),))] == 2
    assert samples[("ragline_queue_depth", (("queue", "generations"),))] == 3, "an exited worker's gauge is dropped"


def test_multiprocess_dir_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "absent"))
    with pytest.raises(MetricsConfigError, match="is not a folder"):
        Metrics()


def test_multiprocess_dir_set_after_import_is_refused(tmp_path, monkeypatch):
    """This process imported prometheus_client without the variable, so its samples would stay private."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(MetricsConfigError, match="set after prometheus_client was imported"):
        Metrics()
