"""The one client of the model services (embedding, rerank and chat servers): pooled connections, a deadline
per call, and retries with backoff on transient failures.

Async first, with one implementation. The client owns an event loop, run in a daemon thread started on first
use, and one `httpx.AsyncClient` on it: one connection pool for every model service the process talks to
(an `AsyncClient`'s connections belong to one loop, so the loop is the client's own rather than each
caller's). Every call is the same coroutine, `_open`, run on that loop:

- async callers on any other loop (the API's) await it there (`await client.apost(...)`, `astream`);
- sync callers (an embedder called from a worker thread) block on it (`client.post(...)`, `stream`): the
  sync face is a thin bridge over the same coroutine, never a second copy of the retry loop.

Per call, `CallPolicy` says how many tries, the backoff, each try's connect and read timeouts and the
deadline of the whole call, retries and waits included: a try gets only the time left, a wait that would
pass the deadline is not waited, and the call ends with `DeadlineExceeded`. An ambient deadline (`deadline`,
a context variable: a request's own) tightens every call made under it. What is retried is the policy of
`ragline.httpretry`: HTTP 429 and 5xx, timeouts and dropped connections, honouring `Retry-After`; any other
4xx ends the call at once (`Rejected`). A stream is retried until it opens; reading it is the caller's.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from ragline.httpretry import TransientError, check_response, retry_wait

log = logging.getLogger(__name__)

T = TypeVar("T")

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("ragline_model_deadline", default=None)


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Every model call made under this block (in this context: worker threads started with it inherit it)
    ends within `seconds` from now, whatever its own policy allows; nested blocks keep the earlier end."""
    if seconds is None:
        yield
        return
    end = time.monotonic() + seconds
    current = _deadline.get()
    token = _deadline.set(end if current is None else min(current, end))
    try:
        yield
    finally:
        _deadline.reset(token)


def describe_error(exc: BaseException) -> str:
    """A transport error in words: its type and message."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class CallPolicy:
    """How one call is made: `tries` in all, the backoff between them (`httpretry.retry_wait`), each try's
    timeouts, and `deadline_s` for the whole call (None: only the tries bound it)."""

    tries: int = 4
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 20.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float | None = 60.0
    deadline_s: float | None = None
    describe: Callable[[BaseException], str] = field(default=describe_error, compare=False)
    label: str = field(default="", compare=False)
    """Who is called, e.g. "LLM at http://…": when set, each retry is logged as a warning."""

    def timeout(self, remaining: float | None) -> httpx.Timeout:
        """One try's timeouts, none beyond the time left."""
        read = self.read_timeout_s
        if remaining is None:
            return httpx.Timeout(read, connect=self.connect_timeout_s)
        return httpx.Timeout(
            remaining if read is None else min(read, remaining), connect=min(self.connect_timeout_s, remaining)
        )


class ModelCallError(Exception):
    """A call that did not succeed; `reason` says why in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Rejected(ModelCallError):
    """The server refused the request with a status that another try would not change (a 4xx but 429)."""

    def __init__(self, reason: str, status_code: int) -> None:
        super().__init__(reason)
        self.status_code = status_code


class GaveUp(ModelCallError):
    """Every try failed transiently; `tries` were made and `last` is the last failure."""

    def __init__(self, tries: int, last: TransientError) -> None:
        super().__init__(str(last))
        self.tries = tries
        self.last = last


class DeadlineExceeded(GaveUp):
    """The call's deadline came before an answer (`tries` made so far, `last` the last failure): its policy's
    `deadline_s`, or with `imposed`, the earlier deadline of the caller (`deadline`), `seconds` long."""

    def __init__(self, tries: int, last: TransientError, seconds: float, imposed: bool = False) -> None:
        super().__init__(tries, last)
        self.seconds = seconds
        self.imposed = imposed


class AsyncStream:
    """An opened (HTTP 200) streamed response, read line by line from any event loop; close it."""

    def __init__(self, client: ModelClient, response: httpx.Response) -> None:
        self._client = client
        self.response = response
        self._lines: AsyncIterator[str] | None = None

    async def _next_line(self) -> str | None:
        if self._lines is None:
            self._lines = self.response.aiter_lines()
        try:
            return await self._lines.__anext__()
        except StopAsyncIteration:
            return None

    async def aiter_lines(self) -> AsyncIterator[str]:
        while (line := await self._client._on_loop(self._next_line())) is not None:
            yield line

    async def aclose(self) -> None:
        await self._client._on_loop(self.response.aclose())


class Stream:
    """The sync face of `AsyncStream`: the same response, read by blocking on the client's loop."""

    def __init__(self, client: ModelClient, response: httpx.Response) -> None:
        self._stream = AsyncStream(client, response)
        self._client = client
        self.response = response

    def iter_lines(self) -> Iterator[str]:
        while (line := self._client._block(self._stream._next_line())) is not None:
            yield line

    def close(self) -> None:
        self._client._block(self.response.aclose())


class ModelClient:
    """Pooled, deadline-bound, retrying HTTP calls to model services, from async and sync code alike.

    `max_connections` bounds the pool (beyond it a call waits for a connection, within its timeouts);
    `max_keepalive` idle connections stay open for `keepalive_s`.
    """

    def __init__(self, *, max_connections: int = 128, max_keepalive: int = 32, keepalive_s: float = 30.0) -> None:
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_keepalive, keepalive_expiry=keepalive_s
        )
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.AsyncClient | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.connections_opened = 0
        """Connections the pool has opened so far (a reused pool opens few)."""

    def __reduce__(self) -> tuple[Any, ...]:
        """Sent to another process (a Ray worker), a client is that process's own: the shared one stays shared."""
        if self is _shared:
            return shared_client, ()
        limits = self._limits
        return _new_client, (limits.max_connections, limits.max_keepalive_connections, limits.keepalive_expiry)

    # --- the loop the calls run on ----------------------------------------------------------------------

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():  # a forked child starts its own loop
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="ragline-model-client", daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                self._http = None
            return self._loop

    def _client(self) -> httpx.AsyncClient:
        """The pool (created on the loop, where it lives)."""
        if self._http is None:
            self._http = httpx.AsyncClient(limits=self._limits, follow_redirects=False)
        return self._http

    async def _trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: counts the connections the pool opens."""
        if event == "connection.connect_tcp.complete":
            self.connections_opened += 1

    async def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await `coroutine` on the client's loop, from any loop (a cancelled caller cancels it there)."""
        loop = self._started()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return await coroutine
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))

    def _block(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the client's loop and wait for it: the sync face."""
        loop = self._started()
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a sync model call on the model client's own loop would wait for itself")
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C, or a caller's own timeout: the call stops there too
            raise

    def close(self) -> None:
        """Close the pool and stop the loop (a later call starts them again)."""
        with self._lock:
            loop, thread, http = self._loop, self._thread, self._http
            self._loop = self._thread = self._http = None
        if loop is None or thread is None or self._pid != os.getpid():
            return
        if http is not None:
            asyncio.run_coroutine_threadsafe(http.aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    # --- the faces -----------------------------------------------------------------------------------------

    async def apost(
        self, url: str, body: Any, *, headers: dict[str, str] | None = None, policy: CallPolicy = CallPolicy()
    ) -> httpx.Response:
        """POST `body` as JSON and return the 2xx response, its body read."""
        return await self._on_loop(self._open(url, body, headers, policy, _deadline.get(), stream=False))

    async def astream(
        self, url: str, body: Any, *, headers: dict[str, str] | None = None, policy: CallPolicy = CallPolicy()
    ) -> AsyncStream:
        """POST `body` as JSON and return the opened HTTP 200 stream (tries until it opens)."""
        response = await self._on_loop(self._open(url, body, headers, policy, _deadline.get(), stream=True))
        return AsyncStream(self, response)

    def post(
        self, url: str, body: Any, *, headers: dict[str, str] | None = None, policy: CallPolicy = CallPolicy()
    ) -> httpx.Response:
        """`apost` for sync code."""
        return self._block(self._open(url, body, headers, policy, _deadline.get(), stream=False))

    def stream(
        self, url: str, body: Any, *, headers: dict[str, str] | None = None, policy: CallPolicy = CallPolicy()
    ) -> Stream:
        """`astream` for sync code."""
        return Stream(self, self._block(self._open(url, body, headers, policy, _deadline.get(), stream=True)))

    # --- the one implementation ----------------------------------------------------------------------------

    async def _open(
        self, url: str, body: Any, headers: dict[str, str] | None, policy: CallPolicy, ambient: float | None,
        *, stream: bool,
    ) -> httpx.Response:
        """Try until a 2xx (a 200 for a stream), a refusal, the last try or the deadline."""
        now = time.monotonic()
        end = now + policy.deadline_s if policy.deadline_s is not None else math.inf
        imposed = ambient is not None and ambient < end  # the caller's deadline comes first
        if imposed:
            end = ambient
        seconds = max(0.0, end - now) if imposed else (policy.deadline_s or 0.0)
        last: TransientError | None = None
        for attempt in range(1, policy.tries + 1):
            remaining = None if end == math.inf else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(attempt - 1, last or TransientError("no time left to try"), seconds, imposed)
            try:
                async with asyncio.timeout(remaining):  # a strict end, whatever the server drips
                    return await self._try(url, body, headers, policy, remaining, stream)
            except TransientError as exc:
                last = exc
            except TimeoutError:
                last = TransientError(f"no answer within the call's deadline ({seconds:g}s)")
            if attempt == policy.tries:
                raise GaveUp(attempt, last)
            wait = retry_wait(attempt, last, policy.backoff_initial_s, policy.backoff_max_s)
            if time.monotonic() + wait >= end:  # waiting would pass the deadline: no try could answer in time
                raise DeadlineExceeded(attempt, last, seconds, imposed)
            if policy.label:
                log.warning("%s: %s; try %d of %d in %.1fs", policy.label, last, attempt + 1, policy.tries, wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last try returns or raises")

    async def _try(
        self, url: str, body: Any, headers: dict[str, str] | None, policy: CallPolicy, remaining: float | None,
        stream: bool,
    ) -> httpx.Response:
        client = self._client()
        request = client.build_request(
            "POST", url, json=body, headers=headers, timeout=policy.timeout(remaining),
            extensions={"trace": self._trace},
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise TransientError(policy.describe(_plain(exc))) from exc
        except httpx.HTTPError as exc:
            raise ModelCallError(policy.describe(exc)) from exc
        if not stream or response.status_code != 200:
            try:
                await response.aread()
            except httpx.TransportError as exc:
                raise TransientError(policy.describe(exc)) from exc
            except httpx.HTTPError as exc:
                raise ModelCallError(policy.describe(exc)) from exc
            finally:
                await response.aclose()
        reason = check_response(response)  # raises TransientError for 429 and 5xx
        if reason is not None:
            raise Rejected(reason, response.status_code)
        return response


def _plain(exc: httpx.TransportError) -> httpx.TransportError:
    """A connect error as the OS said it ("[Errno 111] Connection refused"), where the async stack's own
    words are only "All connection attempts failed"."""
    if not isinstance(exc, httpx.ConnectError):
        return exc
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return httpx.ConnectError(f"[Errno {cause.errno}] {os.strerror(cause.errno)}", request=exc.request)
        cause = cause.__cause__ or cause.__context__
    return exc


_shared: ModelClient | None = None
_shared_lock = threading.Lock()


def shared_client() -> ModelClient:
    """The process's model client: every model service component uses it unless given another."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ModelClient()
        return _shared



def _new_client(max_connections: int, max_keepalive: int, keepalive_s: float) -> ModelClient:
    return ModelClient(max_connections=max_connections, max_keepalive=max_keepalive, keepalive_s=keepalive_s)
