"""What every LLM backend offers the answerer, streaming first.

Answers are streamed to users, so `stream`/`astream` are the primary calls.
They return token streams that carry a `Usage` record, complete once the
stream is exhausted, so concurrent callers never share a "last usage" slot.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Message = dict[str, str]
"""A chat message: {"role": "system" | "user" | "assistant", "content": ...}."""

TOKENS_PER_MESSAGE = 4
"""What a chat template adds per message (role markers, separators), roughly."""


class LLMError(RuntimeError):
    """The model could not produce an answer; the message says which model and why."""


@dataclass(slots=True)
class Usage:
    """Tokens spent by one call, as reported by the backend or counted locally."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the backend did not evaluate for this call: it held them already (a prompt cache)."""

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }


def estimate_usage(usage: Usage, count_tokens: Callable[[str], int], messages: list[Message], answer: str) -> None:
    """Fill in `usage` by counting, for backends that do not report it."""
    usage.prompt_tokens = sum(count_tokens(m["content"]) + TOKENS_PER_MESSAGE for m in messages)
    usage.completion_tokens = count_tokens(answer)


class StreamClock:
    """The deadlines of one streamed generation: the whole answer, and each wait for more text.

    Only text resets the idle clock, so a server that sends nothing but
    keep-alive comments still times out. `overdue()` says which deadline passed.
    """

    def __init__(self, idle_s: float | None, total_s: float | None):
        self.idle_s = idle_s
        self.total_s = total_s
        self.started = self.last_text = time.monotonic()

    def text(self) -> None:
        self.last_text = time.monotonic()

    def overdue(self) -> str | None:
        now = time.monotonic()
        if self.total_s is not None and now - self.started > self.total_s:
            return f"no complete answer within {self.total_s:g}s (generation_timeout_s)"
        if self.idle_s is not None and now - self.last_text > self.idle_s:
            return f"no text for {self.idle_s:g}s (stream_idle_timeout_s)"
        return None


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    usage: Usage
    finish_reason: str | None = None


class TokenStream(Iterator[str]):
    """Text pieces as the model produces them; `usage` is complete once exhausted.

    `produce` is a generator function that yields the pieces and fills in the
    `Usage` it is handed. Exhaust the stream or `close()` it: until then it
    holds a connection, or the lock of a local model.
    """

    def __init__(self, produce: Callable[[Usage], Iterator[str]]):
        self.usage = Usage()
        self._pieces = produce(self.usage)

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop early and release the connection or the model."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


class AsyncTokenStream(AsyncIterator[str]):
    """The async twin of `TokenStream`."""

    def __init__(self, produce: Callable[[Usage], AsyncIterator[str]]):
        self.usage = Usage()
        self._pieces = produce(self.usage)

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._pieces, "aclose", None)
        if aclose is not None:
            await aclose()


@runtime_checkable
class LLM(Protocol):
    """A chat model. Implementations raise `LLMError` for every failure they cannot recover from."""

    name: str
    context_window: int

    def load(self) -> None:
        """Get ready to answer (load weights); slow, so servers call it at startup in a worker thread."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> Completion: ...

    def stream(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> TokenStream: ...

    async def agenerate(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> Completion: ...

    def astream(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> AsyncTokenStream: ...


_END = object()


async def iterate_in_thread(pieces: Iterator[str]) -> AsyncIterator[str]:
    """Drive a blocking iterator from a worker thread, handing items to the event loop.

    The loop never blocks on the iterator. When the consumer stops early, the
    worker is told to stop and closes the iterator after its current item.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            for piece in pieces:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
                if stop.is_set():
                    break
        except BaseException as exc:  # handed to the consumer, who re-raises it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    worker = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        await asyncio.shield(worker)
