"""Chat with any OpenAI-compatible server: vLLM, Ollama, llama.cpp server, OpenAI.

httpx directly rather than an SDK, for exact control over what is retried:
only 429, 5xx, timeouts and connection errors, with exponential backoff and
jitter, honouring `Retry-After`. Other 4xx answers are our mistake and fail at
once. A stream is retried only until it opens; once tokens have reached the
caller, a broken connection is an error, since replaying would duplicate text.

Sync and async calls go through the one model client (`ragline.modelclient`):
the same pooled connections, retry loop and error classification; this class
builds the request and parses the answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx

from ragline.generate.base import (
    AsyncTokenStream,
    Completion,
    LLMError,
    Message,
    StreamClock,
    TokenStream,
    Usage,
    estimate_usage,
)
from ragline.config import LLMSettings
from ragline.generate.tokenizer import count_tokens, load_encoding
from ragline.modelclient import CallPolicy, GaveUp, ModelCallError, ModelClient, Rejected, shared_client

log = logging.getLogger(__name__)

_HINTS = {
    401: "check the api_key",
    403: "check the api_key",
    404: "check base_url (it should end in /v1) and the model name",
}


def read_usage(usage: Usage, reported: dict[str, Any]) -> None:
    """The server's token counts, with the prompt tokens it served from its prefix cache (OpenAI, vLLM)."""
    usage.prompt_tokens = reported.get("prompt_tokens") or 0
    usage.completion_tokens = reported.get("completion_tokens") or 0
    usage.cached_tokens = (reported.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


class _StreamParser:
    """Turns server-sent event lines into text pieces and fills in the usage; enforces the stream deadlines."""

    def __init__(self, llm: OpenAICompatLLM, messages: list[Message], usage: Usage):
        self._llm = llm
        self._messages = messages
        self._usage = usage
        self._pieces: list[str] = []
        self._reported_usage = False
        self._finished = False
        self._clock = StreamClock(llm.stream_idle_timeout_s, llm.generation_timeout_s)

    def feed(self, line: str) -> str | None:
        piece = self._parse(line)
        if piece:
            self._clock.text()
        if reason := self._clock.overdue():  # a server sending only keep-alives never trips the read timeout
            raise self.broken(reason)
        return piece

    def _parse(self, line: str) -> str | None:
        if not line.startswith("data:"):
            return None  # blank separators, comments (keep-alives), event names
        data = line[5:].strip()
        if data == "[DONE]":
            self._finished = True
            return None
        event = self._llm._decode(data)
        if "error" in event:
            raise LLMError(f"LLM at {self._llm.base_url} reported an error mid-stream: {event['error']}")
        if event.get("usage"):
            read_usage(self._usage, event["usage"])
            self._reported_usage = True
        piece = None
        for choice in event.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content") or None
            self._finished = self._finished or choice.get("finish_reason") is not None
        if piece:
            self._pieces.append(piece)
        return piece

    def broken(self, reason: str) -> LLMError:
        return LLMError(f"stream from LLM at {self._llm.base_url} broke after {len(self._pieces)} pieces: {reason}")

    def finish(self) -> None:
        if not self._finished:
            raise self.broken("it ended without a finish_reason or [DONE]")
        if not self._reported_usage:
            estimate_usage(self._usage, self._llm.count_tokens, self._messages, "".join(self._pieces))


class OpenAICompatLLM:
    """A model behind an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None = None,
        context_window: int = 8192,
        tokenizer: str = "cl100k_base",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_tries: int = 4,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 20.0,
        stream_idle_timeout_s: float | None = 60.0,
        generation_timeout_s: float | None = 600.0,
        client: ModelClient | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, not {base_url!r}")
        self.name = model
        self.context_window = context_window
        self.base_url = base_url.rstrip("/")
        self.max_tries = max_tries
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.generation_timeout_s = generation_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._encoding = load_encoding(tokenizer)
        self._client = client or shared_client()
        self._policy = CallPolicy(
            tries=max_tries, backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s,
            connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s, describe=self._describe,
            label=f"LLM at {self.base_url}",
        )

    @classmethod
    def from_settings(cls, settings: LLMSettings, data_dir: Path | None = None) -> OpenAICompatLLM:
        return cls(
            settings.model,
            base_url=settings.base_url,
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
            context_window=settings.context_window,
            tokenizer=settings.tokenizer,
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
            max_tries=settings.max_tries,
            backoff_initial_s=settings.backoff_initial_s,
            backoff_max_s=settings.backoff_max_s,
            stream_idle_timeout_s=settings.stream_idle_timeout_s,
            generation_timeout_s=settings.generation_timeout_s,
        )

    def close(self) -> None:
        """Nothing of its own to close: the connections are the model client's pool."""

    def __enter__(self) -> OpenAICompatLLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def load(self) -> None:
        """Nothing to load: the server holds the model (and answers 503 with Retry-After while it loads)."""

    def count_tokens(self, text: str) -> int:
        return count_tokens(self._encoding, text)

    # --- the public calls -------------------------------------------------

    def generate(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> Completion:
        try:
            response = self._client.post(self.url, self._payload(messages, max_tokens, temperature, stream=False),
                                         headers=self._headers, policy=self._policy)
        except ModelCallError as exc:
            self._failed(exc)
        return self._completion(response.content, messages)

    async def agenerate(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> Completion:
        try:
            response = await self._client.apost(
                self.url, self._payload(messages, max_tokens, temperature, stream=False), headers=self._headers,
                policy=self._policy,
            )
        except ModelCallError as exc:
            self._failed(exc)
        return self._completion(response.content, messages)

    def stream(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> TokenStream:
        payload = self._payload(messages, max_tokens, temperature, stream=True)

        def produce(usage: Usage) -> Iterator[str]:
            try:
                response = self._client.stream(self.url, payload, headers=self._headers, policy=self._policy)
            except ModelCallError as exc:
                self._failed(exc)
            parser = _StreamParser(self, messages, usage)
            try:
                for line in response.iter_lines():
                    if piece := parser.feed(line):
                        yield piece
            except httpx.HTTPError as exc:
                raise parser.broken(self._describe(exc)) from exc
            finally:
                response.close()
            parser.finish()

        return TokenStream(produce)

    def astream(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> AsyncTokenStream:
        payload = self._payload(messages, max_tokens, temperature, stream=True)

        async def produce(usage: Usage) -> AsyncIterator[str]:
            try:
                response = await self._client.astream(self.url, payload, headers=self._headers, policy=self._policy)
            except ModelCallError as exc:
                self._failed(exc)
            parser = _StreamParser(self, messages, usage)
            try:
                async for line in response.aiter_lines():
                    if piece := parser.feed(line):
                        yield piece
            except httpx.HTTPError as exc:
                raise parser.broken(self._describe(exc)) from exc
            finally:
                await response.aclose()
            parser.finish()

        return AsyncTokenStream(produce)

    # --- the request and the answer ----------------------------------------

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _payload(self, messages: list[Message], max_tokens: int, temperature: float, *, stream: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.name,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": stream,
        }
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _failed(self, exc: ModelCallError) -> NoReturn:
        """The model client's failure as an `LLMError`: the tries made, a refusal with what to check, or why."""
        if isinstance(exc, GaveUp):
            raise LLMError(f"LLM at {self.base_url} failed after {exc.tries} tries: {exc.last}") from exc
        if isinstance(exc, Rejected):
            hint = _HINTS.get(exc.status_code)
            raise LLMError(
                f"LLM at {self.base_url} rejected the request for model {self.name!r}: {exc.reason}"
                + (f" ({hint})" if hint else "")
            ) from exc
        raise LLMError(f"LLM at {self.base_url} failed: {exc.reason}") from exc

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, httpx.ConnectTimeout):
            return f"no connection within {self._timeout.connect}s (connect timeout)"
        if isinstance(exc, httpx.ReadTimeout):
            return f"no data within {self._timeout.read}s (read timeout)"
        if isinstance(exc, httpx.ConnectError):
            return f"cannot connect: {exc}"
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    def _decode(self, data: str | bytes) -> dict[str, Any]:
        try:
            decoded = json.loads(data)
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            raise LLMError(f"LLM at {self.base_url} sent something that is not a JSON object: {data[:200]!r}")
        return decoded

    def _completion(self, body: bytes, messages: list[Message]) -> Completion:
        data = self._decode(body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise LLMError(f"LLM at {self.base_url} answered without a message: {body[:200]!r}") from exc
        usage = Usage()
        if reported := data.get("usage"):
            read_usage(usage, reported)
        else:
            estimate_usage(usage, self.count_tokens, messages, text)
        return Completion(text=text, usage=usage, finish_reason=choice.get("finish_reason"))
