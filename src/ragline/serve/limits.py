"""Rate limits: a token bucket per key, in Redis (shared by every server process) or in this process.

Each bucket holds up to `burst` tokens and gets `rate_per_s` back each
second; a request takes `cost` tokens or is refused with the time until they
are back. The Redis bucket lives in one Lua script run with the server's
clock, so processes on several hosts share it exactly, whatever their own
clocks say. A limiter must never take the service down with it: when Redis
fails or is slow, requests are allowed (fail-open) and a warning is logged at
most every 30 s; `ping()` raises instead, so /readyz shows the outage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ragline.config import RateSettings

if TYPE_CHECKING:
    from ragline.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_TIMEOUT_S = 0.5
"""The longest a request waits on Redis before going on without it."""
WARN_EVERY_S = 30.0


class RedisUnavailable(RuntimeError):
    """Redis did not answer a ping: raised by `ping()` for /readyz."""


def redis_client(url: str, timeout_s: float = REDIS_TIMEOUT_S) -> Redis:
    """A client whose every socket wait is bounded, so a hung Redis cannot hang a request."""
    return Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30)


def settings_client(settings: Settings, client: Redis | None, what: str) -> Redis:
    """The client given (shared by the limiter and the cache), else one for `serve.redis_url`."""
    if client is not None:
        return client
    if settings.serve.redis_url is None:
        raise ValueError(f"the Redis {what} needs serve.redis_url (or use the memory one)")
    return redis_client(settings.serve.redis_url)


class RedisGuard:
    """Runs Redis calls under a deadline; on failure returns a fallback and warns at most every 30 s."""

    def __init__(self, client: Redis, what: str, timeout_s: float = REDIS_TIMEOUT_S):
        self.client = client
        self.what = what
        self.timeout_s = timeout_s
        self._last_warning = -math.inf

    async def run(self, call: Callable[[], Awaitable[T]], fallback: T) -> T:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await call()
        except (RedisError, OSError, TimeoutError) as error:
            now = time.monotonic()
            if now - self._last_warning >= WARN_EVERY_S:
                self._last_warning = now
                log.warning(
                    "%s: Redis failed (%s); going on without it until it answers again "
                    "(check serve.redis_url and that Redis is up)",
                    self.what,
                    str(error) or type(error).__name__,
                )
            return fallback

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError) as error:
            raise RedisUnavailable(
                f"{self.what}: Redis did not answer a ping within {self.timeout_s} s "
                f"({str(error) or type(error).__name__}); check serve.redis_url and that Redis is up"
            ) from error

    async def close(self) -> None:
        await self.client.aclose()


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_s: float
    """0 when allowed; else the seconds until `cost` tokens are back."""
    remaining: int
    """Whole tokens left in the bucket after this decision."""


class RateLimiter(Protocol):
    async def take(self, key: str, rate: RateSettings, cost: float = 1.0) -> Decision: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def _check_cost(rate: RateSettings, cost: float) -> None:
    if not 0 < cost <= rate.burst:
        raise ValueError(
            f"a request costing {cost} tokens can never pass a bucket of burst {rate.burst}; "
            "use a cost between 0 and the burst, or raise the burst"
        )


# KEYS[1]: the bucket; ARGV: rate_per_s, burst, cost. A missing key is a full bucket; a bucket that is
# full again is deleted, and every other one expires when it would be full, so idle keys cost nothing.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = burst
if state[1] then
  tokens = math.min(burst, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
end
local allowed = 0
local retry_after = (cost - tokens) / rate
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
  retry_after = 0
end
if tokens >= burst then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000))
end
return {allowed, string.format('%.17g', retry_after), string.format('%.17g', tokens)}
"""


class RedisRateLimiter:
    """Token buckets in Redis under `prefix`: one bucket per key for every server process using that Redis.

    `client` is a redis.asyncio client (build it with `redis_client` so its
    sockets time out); `close()` closes it.
    """

    def __init__(self, client: Redis, prefix: str = "ragline:rl:"):
        self.prefix = prefix
        self._guard = RedisGuard(client, "rate limiter")
        self._take = client.register_script(_TAKE)

    @classmethod
    def from_settings(cls, settings: Settings, client: Redis | None = None) -> RedisRateLimiter:
        return cls(settings_client(settings, client, "rate limiter"))

    async def take(self, key: str, rate: RateSettings, cost: float = 1.0) -> Decision:
        _check_cost(rate, cost)
        reply = await self._guard.run(
            lambda: self._take(keys=[self.prefix + key], args=[rate.rate_per_s, rate.burst, cost]),
            fallback=None,
        )
        if reply is None:
            return Decision(allowed=True, retry_after_s=0.0, remaining=rate.burst)
        allowed, retry_after, tokens = reply
        return Decision(allowed=bool(allowed), retry_after_s=max(0.0, float(retry_after)), remaining=int(float(tokens)))

    async def ping(self) -> None:
        await self._guard.ping()

    async def close(self) -> None:
        await self._guard.close()


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    full_at: float


class MemoryRateLimiter:
    """Token buckets in this process (one server process, or tests), on the monotonic clock.

    `take` never awaits between reading and writing a bucket, so concurrent
    tasks cannot both spend the same tokens. Buckets that are full again are
    dropped now and then, so memory follows the keys active in the last
    `burst / rate_per_s` seconds, not every key ever seen.
    """

    def __init__(self, sweep_every_s: float = 10.0) -> None:
        self.sweep_every_s = sweep_every_s
        self._buckets: dict[str, _Bucket] = {}
        self._next_sweep = time.monotonic() + sweep_every_s

    @classmethod
    def from_settings(cls, settings: Settings, client: Redis | None = None) -> MemoryRateLimiter:
        return cls()

    async def take(self, key: str, rate: RateSettings, cost: float = 1.0) -> Decision:
        _check_cost(rate, cost)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._buckets = {name: bucket for name, bucket in self._buckets.items() if bucket.full_at > now}
            self._next_sweep = now + self.sweep_every_s
        bucket = self._buckets.get(key)
        tokens = float(rate.burst)
        if bucket is not None:
            tokens = min(tokens, bucket.tokens + (now - bucket.at) * rate.rate_per_s)
        allowed = tokens >= cost
        retry_after = 0.0 if allowed else (cost - tokens) / rate.rate_per_s
        if allowed:
            tokens -= cost
        if tokens >= rate.burst:
            self._buckets.pop(key, None)
        else:
            self._buckets[key] = _Bucket(tokens, now, now + (rate.burst - tokens) / rate.rate_per_s)
        return Decision(allowed=allowed, retry_after_s=retry_after, remaining=int(tokens))

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._buckets.clear()
