"""Retry policy for calls to remote model servers: backoff with jitter, on transient failures only.

Transient means HTTP 429, HTTP 5xx, timeouts and dropped connections; any
other 4xx is a mistake in the request and fails at once. A server's
`Retry-After` header (seconds or an HTTP date) is honoured, capped at the
longest backoff.
Clients raise `TransientError` for what is worth another try and hand
`retry_policy(...)` to tenacity's `Retrying` or `AsyncRetrying`.
"""

from __future__ import annotations

import time
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from tenacity import RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter


class TransientError(Exception):
    """A failure another try may fix; `retry_after` is the server's wish, in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def is_transient_status(status: int) -> bool:
    return status == 429 or status >= 500


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Seconds from a `Retry-After` header: a number of seconds or an HTTP date (RFC 9110 allows both)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unparseable: the backoff decides
    if when.tzinfo is None:  # "-0000": an HTTP date is GMT whatever the form
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def error_detail(response: httpx.Response) -> str:
    """The server's own error message (OpenAI style `{"error": {"message": ...}}`), else the body start."""
    try:
        error = response.json()["error"]
        detail = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        detail = response.text
    return " ".join(detail.split())[:300]


def check_response(response: httpx.Response) -> str | None:
    """None for a 2xx; raises `TransientError` for 429/5xx; else returns the reason to report."""
    if response.is_success:
        return None
    reason = f"HTTP {response.status_code} {response.reason_phrase}: {error_detail(response)}"
    if is_transient_status(response.status_code):
        raise TransientError(reason, retry_after_seconds(response))
    return reason


def retry_policy(attempts: int, initial_wait: float = 0.5, max_wait: float = 20.0) -> dict[str, Any]:
    """Keyword arguments for tenacity; after the last try tenacity raises `RetryError`."""
    backoff = wait_exponential_jitter(initial=initial_wait, max=max_wait, jitter=initial_wait)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            return min(exc.retry_after, max_wait)
        return backoff(state)

    return {"stop": stop_after_attempt(attempts), "wait": wait, "retry": retry_if_exception_type(TransientError)}
