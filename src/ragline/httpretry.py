"""Retry policy for calls to remote model servers: backoff with jitter, on transient failures only.

Transient means HTTP 429, HTTP 5xx, timeouts and dropped connections; any
other 4xx is a mistake in the request and fails at once. A server's
`Retry-After` header (seconds or an HTTP date) is honoured, capped at the
longest backoff.
Clients raise `TransientError` for what is worth another try; `ragline.modelclient`
(the one client of the model services) waits `retry_wait(...)` between tries.
"""

from __future__ import annotations

import random
import time
from datetime import timezone
from email.utils import parsedate_to_datetime

import httpx


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


def retry_wait(attempt: int, error: BaseException | None, initial_wait: float = 0.5, max_wait: float = 20.0) -> float:
    """Seconds to wait after failed try number `attempt` (from 1): the server's `Retry-After` when it gave one,
    else exponential backoff with jitter (`initial * 2**(attempt-1)` plus up to `initial`), both capped at
    `max_wait`."""
    if isinstance(error, TransientError) and error.retry_after is not None:
        return min(error.retry_after, max_wait)
    return max(0.0, min(initial_wait * 2 ** (attempt - 1) + random.uniform(0, initial_wait), max_wait))
