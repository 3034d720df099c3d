"""Retry policy for calls to remote model servers: backoff with jitter, on transient failures only.

Transient means HTTP 429, HTTP 5xx, timeouts and connection errors; any
other 4xx is a mistake in the request and is raised at once. A server's
`Retry-After` header (seconds) is honoured when it asks for longer than
the backoff would wait.
"""

from __future__ import annotations

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status == 429 or status >= 500
    return isinstance(exc, (httpx.TimeoutException, httpx.TransportError))


def _retry_after_seconds(exc: BaseException | None) -> float:
    if isinstance(exc, httpx.HTTPStatusError):
        value = exc.response.headers.get("retry-after", "")
        try:
            return max(float(value), 0.0)
        except ValueError:
            return 0.0
    return 0.0


class _BackoffOrRetryAfter:
    def __init__(self, initial: float, maximum: float) -> None:
        self._backoff = wait_exponential_jitter(initial=initial, max=maximum, jitter=initial)
        self._maximum = maximum

    def __call__(self, state: RetryCallState) -> float:
        asked = _retry_after_seconds(state.outcome.exception() if state.outcome else None)
        return max(self._backoff(state), min(asked, self._maximum))


def retry_policy(attempts: int, initial_wait: float = 0.5, max_wait: float = 20.0) -> dict:
    """Keyword arguments for tenacity's `Retrying`/`AsyncRetrying`; the last error is re-raised."""
    return {
        "retry": retry_if_exception(is_transient),
        "stop": stop_after_attempt(attempts),
        "wait": _BackoffOrRetryAfter(initial_wait, max_wait),
        "reraise": True,
    }


def describe(exc: BaseException) -> str:
    """One line for a user: the HTTP status and body start, or the transport error."""
    if isinstance(exc, httpx.HTTPStatusError):
        body = exc.response.text[:200].strip()
        return f"HTTP {exc.response.status_code} {exc.response.reason_phrase}: {body}"
    return f"{type(exc).__name__}: {exc}"


__all__ = ["Retrying", "describe", "is_transient", "retry_policy"]
