"""A real OpenAI-compatible HTTP server on 127.0.0.1 whose answers each test scripts, and test hits.

Each request to `/v1/chat/completions` takes the next scripted reply, so a test
can say "429 with Retry-After, then a stream that breaks after two pieces" and
then check what the client did. Requests are recorded with their arrival time.
Streams use chunked transfer encoding like vLLM and uvicorn do, so dropping the
connection mid-stream is an incomplete body, not a clean end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from ragline.types import Chunk, Hit


@dataclass
class Reply:
    """A plain (non-streamed) answer, sent after `delay_s`."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Stream:
    """An SSE answer: one chunk per piece, optionally dropping the connection after `break_after` pieces.

    `keepalives` comment lines (`: keep-alive`), one every `keepalive_every_s`, come before the pieces,
    as servers send while a long prompt is processed.
    """

    pieces: list[str]
    break_after: int | None = None
    delay_s: float = 0.0
    piece_delay_s: float = 0.0
    usage: dict[str, Any] | None = None
    done: bool = True
    keepalives: int = 0
    keepalive_every_s: float = 0.05


@dataclass
class Received:
    at: float
    body: dict[str, Any]
    headers: dict[str, str]
    peer: tuple[str, int] | None = None
    """The client's address: one per connection it opened."""


def completion(text: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON of a non-streamed chat completion."""
    body: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def free_port() -> int:
    """A free port on 127.0.0.1 for a server to listen on (or, left alone, for connection-refused tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ScriptedLLMServer:
    """`fallback`, if given, answers every request once the script is used up."""

    def __init__(self, fallback: Callable[[dict[str, Any]], Reply] | None = None) -> None:
        self._fallback = fallback
        self.received: list[Received] = []
        self._script: list[Reply | Stream] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *replies: Reply | Stream) -> None:
        with self._lock:
            self._script = list(replies)
            self.received = []

    def __enter__(self) -> ScriptedLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self, body: dict[str, Any], headers: dict[str, str], peer: tuple[str, int] | None = None) -> Reply | Stream:
        with self._lock:
            self.received.append(Received(time.monotonic(), body, headers, peer))
            if self._script:
                return self._script.pop(0)
        if self._fallback is not None:
            return self._fallback(body)
        return Reply(500, {"error": {"message": "the test script has no more replies"}})

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                reply = server._next(body, dict(self.headers), tuple(self.client_address[:2]))
                time.sleep(reply.delay_s)
                try:
                    if isinstance(reply, Stream):
                        self._stream(reply)
                    else:
                        self._reply(reply)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (timeout): fine

            def _reply(self, reply: Reply) -> None:
                data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                encoded = data.encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(encoded)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(encoded)

            def _stream(self, reply: Stream) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._event({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
                for _ in range(reply.keepalives):
                    time.sleep(reply.keepalive_every_s)
                    self._chunk(b": keep-alive\n\n")
                for i, piece in enumerate(reply.pieces):
                    if i == reply.break_after:
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    time.sleep(reply.piece_delay_s)
                    self._event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                if reply.done:
                    self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    if reply.usage is not None:
                        self._event({"choices": [], "usage": reply.usage})
                    self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")

            def _event(self, event: dict[str, Any]) -> None:
                self._chunk(f"data: {json.dumps(event)}\n\n".encode())

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        return Handler


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_until_ready(get: Callable[[str], Any], deadline_s: float = 120) -> dict[str, Any]:
    """Poll /readyz (with a deadline) until every component has loaded or failed; return the report."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        response = get("/readyz")
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 503 and response.headers["retry-after"]
        if response.json()["status"] == "failed":
            return response.json()
        time.sleep(0.05)
    pytest.fail("the API did not get ready")


def make_hit(n: int, text: str, *, title: str | None = None, score: float = 1.0) -> Hit:
    """A retrieved passage as the retriever would return it, from page n of the test docs."""
    metadata = {
        "title": title or f"Page {n}",
        "url": f"https://docs.example.org/page{n}.html",
        "anchor": f"section-{n}",
        "source": f"docs/page{n}.md",
        "heading_path": (title or f"Page {n}",),
    }
    return Hit(Chunk(chunk_id=f"c{n}", doc_id=f"d{n}", text=text, metadata=metadata), score)
