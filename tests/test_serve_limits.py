"""The rate limiter contract, run on the Redis limiter (real Redis at 127.0.0.1:6379) and the in-process one."""

from __future__ import annotations

import asyncio
import logging

import pytest

redis = pytest.importorskip("redis")

from conftest import REDIS_URL, redis_keys  # noqa: E402

from ragline import registry  # noqa: E402
from ragline.config import RateSettings, ServeSettings, Settings  # noqa: E402
from ragline.serve.limits import (  # noqa: E402
    MemoryRateLimiter,
    RedisRateLimiter,
    RedisUnavailable,
    redis_client,
)

SLOW = RateSettings(rate_per_s=0.01, burst=3)
"""Refills one token in 100 s: nothing comes back while a test runs."""
FAST = RateSettings(rate_per_s=20, burst=2)




@pytest.fixture(params=["redis", "memory"])
def new_limiter(request, redis_prefix):
    """Builds a limiter inside the running event loop (a Redis client belongs to the loop it first ran on)."""
    if request.param == "redis":
        return lambda: RedisRateLimiter(redis_client(REDIS_URL), prefix=redis_prefix)
    return MemoryRateLimiter


def test_allows_the_burst_then_refuses_until_tokens_are_back(new_limiter):
    async def scenario():
        limiter = new_limiter()
        decisions = [await limiter.take("client", SLOW) for _ in range(4)]
        await limiter.close()
        return decisions

    *allowed, refused = asyncio.run(scenario())
    assert [d.allowed for d in allowed] == [True, True, True]
    assert [d.remaining for d in allowed] == [2, 1, 0]
    assert all(d.retry_after_s == 0 for d in allowed)
    assert not refused.allowed and refused.remaining == 0
    assert 0 < refused.retry_after_s <= 1 / SLOW.rate_per_s


def test_tokens_come_back_over_time(new_limiter):
    async def scenario():
        limiter = new_limiter()
        drained = [(await limiter.take("client", FAST)).allowed for _ in range(3)]
        await asyncio.sleep(0.25)  # five tokens' worth at 20/s, capped at the burst of 2
        refilled = [(await limiter.take("client", FAST)).allowed for _ in range(3)]
        await limiter.close()
        return drained, refilled

    drained, refilled = asyncio.run(scenario())
    assert drained == [True, True, False]
    assert refilled == [True, True, False]


def test_keys_have_separate_buckets(new_limiter):
    async def scenario():
        limiter = new_limiter()
        for _ in range(SLOW.burst):
            await limiter.take("a", SLOW)
        decisions = await limiter.take("a", SLOW), await limiter.take("b", SLOW)
        await limiter.close()
        return decisions

    a, b = asyncio.run(scenario())
    assert not a.allowed
    assert b.allowed and b.remaining == SLOW.burst - 1


def test_a_request_may_cost_several_tokens(new_limiter):
    rate = RateSettings(rate_per_s=0.01, burst=5)

    async def scenario():
        limiter = new_limiter()
        decisions = [await limiter.take("client", rate, cost) for cost in (3, 3, 2, 1)]
        await limiter.close()
        return decisions

    first, too_dear, rest, none_left = asyncio.run(scenario())
    assert first.allowed and first.remaining == 2
    assert not too_dear.allowed and too_dear.remaining == 2
    assert 0 < too_dear.retry_after_s <= 1 / rate.rate_per_s  # one token short
    assert rest.allowed and rest.remaining == 0
    assert not none_left.allowed


def test_a_cost_beyond_the_burst_is_refused_as_a_mistake(new_limiter):
    async def scenario():
        limiter = new_limiter()
        try:
            await limiter.take("client", SLOW, cost=SLOW.burst + 1)
        finally:
            await limiter.close()

    with pytest.raises(ValueError, match="burst"):
        asyncio.run(scenario())


def test_concurrent_takes_never_spend_a_token_twice(new_limiter):
    rate = RateSettings(rate_per_s=0.01, burst=10)

    async def scenario():
        limiter = new_limiter()
        decisions = await asyncio.gather(*(limiter.take("client", rate) for _ in range(50)))
        await limiter.close()
        return decisions

    assert sum(d.allowed for d in asyncio.run(scenario())) == 10


def test_server_processes_share_one_bucket_through_redis(redis_prefix):
    """Five limiters on five connections, as five server processes would have: still exactly one burst."""
    rate = RateSettings(rate_per_s=0.01, burst=10)

    async def scenario():
        limiters = [RedisRateLimiter(redis_client(REDIS_URL), prefix=redis_prefix) for _ in range(5)]
        decisions = await asyncio.gather(*(limiters[i % 5].take("client", rate) for i in range(50)))
        for limiter in limiters:
            await limiter.close()
        return decisions

    assert sum(d.allowed for d in asyncio.run(scenario())) == 10


def test_redis_buckets_expire_once_full_again(redis_prefix):
    async def scenario():
        limiter = RedisRateLimiter(redis_client(REDIS_URL), prefix=redis_prefix)
        await limiter.take("client", FAST)
        stored = redis_keys(redis_prefix)
        await asyncio.sleep(0.3)  # a full bucket again after 0.05 s
        await limiter.close()
        return stored

    assert asyncio.run(scenario()) == [f"{redis_prefix}client".encode()]
    assert redis_keys(redis_prefix) == []


def test_memory_limiter_forgets_buckets_that_are_full_again():
    async def scenario():
        limiter = MemoryRateLimiter(sweep_every_s=0.0)
        for key in ("a", "b", "c"):
            await limiter.take(key, FAST)
        kept_while_refilling = set(limiter._buckets)
        await asyncio.sleep(0.3)
        await limiter.take("d", FAST)
        return kept_while_refilling, set(limiter._buckets)

    refilling, after = asyncio.run(scenario())
    assert refilling == {"a", "b", "c"}
    assert after == {"d"}


def test_an_unreachable_redis_lets_requests_through_and_fails_ping(caplog):
    async def scenario():
        limiter = RedisRateLimiter(redis_client("redis://127.0.0.1:1/0", timeout_s=0.2))
        decisions = [await limiter.take("client", SLOW) for _ in range(5)]
        with pytest.raises(RedisUnavailable, match="serve.redis_url"):
            await limiter.ping()
        await limiter.close()
        return decisions

    with caplog.at_level(logging.WARNING, logger="ragline.serve.limits"):
        decisions = asyncio.run(scenario())
    assert all(d.allowed for d in decisions)
    assert len([r for r in caplog.records if "Redis failed" in r.getMessage()]) == 1


def test_a_redis_that_never_answers_lets_requests_through_within_the_deadline():
    """A server that accepts connections and then hangs: the limiter's own deadline, not the socket's, ends the wait."""

    async def scenario():
        hung: list[asyncio.StreamWriter] = []

        async def accept_and_hang(reader, writer):
            hung.append(writer)

        server = await asyncio.start_server(accept_and_hang, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        limiter = RedisRateLimiter(redis_client(f"redis://127.0.0.1:{port}/0", timeout_s=30))
        try:
            async with asyncio.timeout(10):
                decision = await limiter.take("client", SLOW)
                with pytest.raises(RedisUnavailable):
                    await limiter.ping()
        finally:
            for writer in hung:
                writer.close()
            server.close()
            await server.wait_closed()
            await limiter.close()
        return decision

    assert asyncio.run(scenario()).allowed


@pytest.mark.parametrize("name, expected", [("redis", RedisRateLimiter), ("memory", MemoryRateLimiter)])
def test_the_registry_builds_each_limiter_from_settings(name, expected):
    settings = Settings(serve=ServeSettings(redis_url=REDIS_URL))

    async def scenario():
        limiter = registry.resolve("rate_limiter", name).from_settings(settings)
        await limiter.ping()
        await limiter.close()
        return limiter

    assert isinstance(asyncio.run(scenario()), expected)


def test_the_redis_limiter_needs_a_url():
    with pytest.raises(ValueError, match="serve.redis_url"):
        RedisRateLimiter.from_settings(Settings())
