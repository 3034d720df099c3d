"""What the API can serve yet, and the bounded queue of answers being generated.

Components load at startup in a worker thread (the embedding model, the
1.1 GB LLM that may first be assembled and hashed), so the event loop answers
`/healthz` and `/readyz` from the first second. Requests that need a component
still loading get a 503 with `Retry-After`, never a wait on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed"]

_HOST_PATH = re.compile(r"(?<![\w.:/~-])~?(?:/[^\s/'\"()<>,;]+){2,}/?")


def without_host_paths(message: str) -> str:
    """Replace absolute paths in a message by their last part: clients need the reason, not our file tree."""
    return _HOST_PATH.sub(lambda match: match.group().rstrip("/").rsplit("/", 1)[-1], message)


class Unavailable(Exception):
    """The API cannot serve this request now; becomes a 503 with `Retry-After` and `{"code", "message"}`."""

    def __init__(self, code: str, message: str, retry_after_s: int):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class ComponentState:
    status: Status = "loading"
    reason: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"status": self.status, **({"reason": self.reason} if self.reason else {})}


class Readiness:
    """Each component's state, written by the loading thread and read by the event loop.

    A component that failed but whose work degrades (an LLM that cannot load:
    answers are extracted instead) is marked with `degrade`; the API stays
    ready, reporting "degraded".
    """

    def __init__(self, names: list[str], retry_after_s: int):
        self.components = {name: ComponentState() for name in names}
        self.degraded: set[str] = set()
        self.retry_after_s = retry_after_s

    def load(self, name: str, build: Callable[[], str]) -> bool:
        """Run `build` (in the loading thread); it returns a detail to report, or raises when the component failed."""
        try:
            detail = build()
        except Exception as exc:  # reported in /readyz; the traceback goes to the server log only
            log.exception("loading the %s failed", name)
            self.components[name] = ComponentState("failed", without_host_paths(str(exc) or type(exc).__name__))
            return False
        self.components[name] = ComponentState("ready", without_host_paths(detail))
        return True

    def degrade(self, name: str, reason: str) -> None:
        """The component failed, but requests are still served without it (the reason says how)."""
        self.degraded.add(name)
        self.components[name] = ComponentState("failed", without_host_paths(reason))

    def overall(self) -> str:
        states = self.components.values()
        if any(s.status == "loading" for s in states):
            return "loading"
        failed = {name for name, s in self.components.items() if s.status == "failed"}
        if failed - self.degraded:
            return "failed"
        return "degraded" if failed else "ready"

    def report(self) -> dict[str, Any]:
        return {"status": self.overall(), "components": {name: s.as_dict() for name, s in self.components.items()}}

    def require(self, *names: str) -> None:
        """Raise `Unavailable` unless every named component can serve."""
        for name in names:
            state = self.components[name]
            if state.status == "loading":
                raise Unavailable("loading", f"the {name} is still loading; retry shortly", self.retry_after_s)
            if state.status == "failed" and name not in self.degraded:
                raise Unavailable("unavailable", f"the {name} failed to load: {state.reason}", self.retry_after_s)


class GenerationQueue:
    """At most `concurrent` answers generate at once and `queued` more wait for a turn.

    `admit()` decides at once, on the event loop: a place, or `Unavailable`
    (a 503 with `Retry-After`), so a burst of questions never piles up into a
    frozen server. An `Admission` is used once: `async with` waits for a
    turn; `release()` gives the place back, whether or not the turn came.
    """

    def __init__(self, concurrent: int, queued: int, retry_after_s: int):
        self._turns = asyncio.Semaphore(concurrent)
        self._capacity = concurrent + queued
        self._retry_after_s = retry_after_s
        self.admitted = 0
        """Answers generating or waiting now."""
        self.served = 0
        """Answers that got a turn since startup."""

    def admit(self) -> Admission:
        if self.admitted >= self._capacity:
            raise Unavailable(
                "busy",
                f"{self.admitted} answers are being generated or waiting, the most this server takes; "
                f"retry in {self._retry_after_s}s",
                self._retry_after_s,
            )
        self.admitted += 1
        return Admission(self)


class Admission:
    def __init__(self, queue: GenerationQueue):
        self._queue = queue
        self._turn = False
        self._released = False

    @property
    def must_wait(self) -> bool:
        """Every turn is taken: entering waits for one."""
        return not self._turn and self._queue._turns.locked()

    async def __aenter__(self) -> Admission:
        await self._queue._turns.acquire()
        self._turn = True
        self._queue.served += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if self._turn:
            self._turn = False
            self._queue._turns.release()
        if not self._released:
            self._released = True
            self._queue.admitted -= 1
