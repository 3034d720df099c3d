"""The answer cache contract, run on the Redis cache (real Redis at 127.0.0.1:6379) and the in-process one."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

redis = pytest.importorskip("redis")

from conftest import REDIS_URL, redis_keys  # noqa: E402

from ragline import registry  # noqa: E402
from ragline.config import ServeSettings, Settings  # noqa: E402
from ragline.serve.cache import (  # noqa: E402
    MemoryAnswerCache,
    RedisAnswerCache,
    answer_key,
    cache_namespace,
)
from ragline.serve.limits import RedisUnavailable, redis_client  # noqa: E402
from ragline.store.base import Scope  # noqa: E402

ANSWER = {
    "answer": "Paris — la capitale.",
    "citations": [{"source": "a.md", "score": 0.875}],
    "nested": {"n": [1, None]},
}
SCOPE = Scope("acme", frozenset({"sales", "hr"}))
NAMESPACE = cache_namespace(SCOPE, "v1", "fp")
DIM = 384




@pytest.fixture(params=["redis", "memory"])
def new_cache(request, redis_prefix):
    """Builds a cache inside the running event loop (a Redis client belongs to the loop it first ran on)."""
    if request.param == "redis":
        return lambda: RedisAnswerCache(redis_client(REDIS_URL), prefix=redis_prefix)
    return MemoryAnswerCache


def _unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _near(vector: np.ndarray, seed: int = 99) -> np.ndarray:
    """A vector at cosine ~0.99 from `vector`."""
    return vector + 0.15 * _unit(seed)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# -- keys ------------------------------------------------------------------------------------------


def test_the_key_ignores_case_spacing_and_sentence_marks():
    assert answer_key("What is X?", SCOPE, "v1", "fp") == answer_key("  what   is x ", SCOPE, "v1", "fp")
    assert answer_key("WHAT IS X!", SCOPE, "v1", "fp") == answer_key("what is x", SCOPE, "v1", "fp")
    assert answer_key("What is C++?", SCOPE, "v1", "fp") != answer_key("What is C?", SCOPE, "v1", "fp")
    assert answer_key("What is X?", SCOPE, "v1", "fp") != answer_key("What is Y?", SCOPE, "v1", "fp")


def test_the_key_and_namespace_change_with_tenant_groups_index_and_setup():
    base = answer_key("q", SCOPE, "v1", "fp")
    variants = [
        answer_key("q", Scope("other", SCOPE.groups), "v1", "fp"),
        answer_key("q", Scope("acme", frozenset({"sales"})), "v1", "fp"),
        answer_key("q", Scope("acme", None), "v1", "fp"),
        answer_key("q", Scope("acme", frozenset({"all"})), "v1", "fp"),
        answer_key("q", SCOPE, "v2", "fp"),
        answer_key("q", SCOPE, "v1", "fp2"),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert answer_key("q", Scope("acme", frozenset({"hr", "sales"})), "v1", "fp") == base  # group order is no matter
    assert len(base) == 64 and int(base, 16) >= 0

    namespaces = {
        cache_namespace(SCOPE, "v1", "fp"),
        cache_namespace(Scope("other", SCOPE.groups), "v1", "fp"),
        cache_namespace(Scope("acme", None), "v1", "fp"),
        cache_namespace(SCOPE, "v2", "fp"),
        cache_namespace(SCOPE, "v1", "fp2"),
    }
    assert len(namespaces) == 5


# -- exact -----------------------------------------------------------------------------------------


def test_an_answer_comes_back_as_stored(new_cache):
    async def scenario():
        cache = new_cache()
        await cache.put("k1", ANSWER, ttl_s=60)
        found = await cache.get("k1"), await cache.get("k2")
        await cache.close()
        return found

    hit, miss = asyncio.run(scenario())
    assert hit == ANSWER
    assert miss is None


def test_a_returned_answer_is_a_copy(new_cache):
    async def scenario():
        cache = new_cache()
        await cache.put("k1", ANSWER, ttl_s=60)
        (await cache.get("k1"))["answer"] = "changed by a caller"
        found = await cache.get("k1")
        await cache.close()
        return found

    assert asyncio.run(scenario()) == ANSWER


def test_an_answer_expires_after_its_ttl(new_cache):
    async def scenario():
        cache = new_cache()
        await cache.put("k1", ANSWER, ttl_s=1)
        await asyncio.sleep(1.2)
        found = await cache.get("k1")
        await cache.close()
        return found

    assert asyncio.run(scenario()) is None


# -- semantic --------------------------------------------------------------------------------------


def test_a_close_question_hits_and_a_far_one_misses(new_cache):
    stored, far = _unit(1), _unit(2)
    assert _cosine(stored, _near(stored)) > 0.98 and _cosine(stored, far) < 0.3

    async def scenario():
        cache = new_cache()
        await cache.remember(NAMESPACE, stored, ANSWER, ttl_s=60, max_entries=10)
        found = (
            await cache.nearest(NAMESPACE, _near(stored), threshold=0.95),
            await cache.nearest(NAMESPACE, far, threshold=0.95),
            await cache.nearest(cache_namespace(SCOPE, "v2", "fp"), stored, threshold=0.95),
        )
        await cache.close()
        return found

    near, far_hit, other_namespace = asyncio.run(scenario())
    assert near == ANSWER
    assert far_hit is None
    assert other_namespace is None


def test_the_most_similar_entry_wins(new_cache):
    first, second = _unit(1), _unit(2)

    async def scenario():
        cache = new_cache()
        await cache.remember(NAMESPACE, first, {"n": 1}, ttl_s=60, max_entries=10)
        await cache.remember(NAMESPACE, second, {"n": 2}, ttl_s=60, max_entries=10)
        found = await cache.nearest(NAMESPACE, first, 0.95), await cache.nearest(NAMESPACE, _near(second), 0.95)
        await cache.close()
        return found

    assert asyncio.run(scenario()) == ({"n": 1}, {"n": 2})


def test_a_full_namespace_keeps_its_newest_entries(new_cache):
    vectors = [_unit(seed) for seed in range(5)]

    async def scenario():
        cache = new_cache()
        for number, vector in enumerate(vectors):
            await cache.remember(NAMESPACE, vector, {"n": number}, ttl_s=60, max_entries=3)
        found = [await cache.nearest(NAMESPACE, vector, threshold=0.95) for vector in vectors]
        await cache.close()
        return found

    assert asyncio.run(scenario()) == [None, None, {"n": 2}, {"n": 3}, {"n": 4}]


def test_a_remembered_answer_expires_after_its_ttl(new_cache):
    async def scenario():
        cache = new_cache()
        await cache.remember(NAMESPACE, _unit(1), ANSWER, ttl_s=1, max_entries=10)
        await asyncio.sleep(1.2)
        found = await cache.nearest(NAMESPACE, _unit(1), threshold=0.95)
        await cache.close()
        return found

    assert asyncio.run(scenario()) is None


def test_every_redis_key_expires(redis_prefix):
    """Nothing the cache writes outlives its TTL: no key without an expiry is left behind."""

    async def scenario():
        cache = RedisAnswerCache(redis_client(REDIS_URL), prefix=redis_prefix)
        await cache.put("k1", ANSWER, ttl_s=60)
        for seed in range(4):
            await cache.remember(NAMESPACE, _unit(seed), ANSWER, ttl_s=60, max_entries=2)
        await cache.close()

    asyncio.run(scenario())
    keys = redis_keys(redis_prefix)
    assert len(keys) == 4  # the exact answer; the namespace's vectors, values and order
    with redis.Redis.from_url(REDIS_URL) as client:
        assert all(0 < client.ttl(key) <= 60 for key in keys)
        vectors_key = next(key for key in keys if key.endswith(b":vectors"))
        values_key = next(key for key in keys if key.endswith(b":values"))
        assert client.hlen(vectors_key) == client.hlen(values_key) == 2


# -- failures --------------------------------------------------------------------------------------


def test_an_unreachable_redis_misses_without_raising(caplog):
    async def scenario():
        cache = RedisAnswerCache(redis_client("redis://127.0.0.1:1/0", timeout_s=0.2))
        await cache.put("k1", ANSWER, ttl_s=60)
        await cache.remember(NAMESPACE, _unit(1), ANSWER, ttl_s=60, max_entries=10)
        found = await cache.get("k1"), await cache.nearest(NAMESPACE, _unit(1), threshold=0.95)
        with pytest.raises(RedisUnavailable, match="answer cache"):
            await cache.ping()
        await cache.close()
        return found

    with caplog.at_level(logging.WARNING, logger="ragline.serve.limits"):
        assert asyncio.run(scenario()) == (None, None)
    assert len([r for r in caplog.records if "answer cache: Redis failed" in r.getMessage()]) == 1


def test_a_client_that_decodes_replies_is_refused():
    with pytest.raises(ValueError, match="decode_responses"):
        RedisAnswerCache(redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True))


def test_the_memory_cache_stays_within_max_items():
    async def scenario():
        cache = MemoryAnswerCache(max_items=3)
        for number in range(5):
            await cache.put(f"k{number}", {"n": number}, ttl_s=60)
        for seed in range(3):
            await cache.remember(f"ns{seed}", _unit(seed), {"n": seed}, ttl_s=60, max_entries=2)
        await cache.remember("ns2", _unit(10), {"n": 10}, ttl_s=60, max_entries=2)
        exact = [await cache.get(f"k{number}") for number in range(5)]
        semantic = [await cache.nearest(f"ns{seed}", _unit(seed), 0.95) for seed in range(3)]
        return exact, semantic

    exact, semantic = asyncio.run(scenario())
    assert exact == [None, None, {"n": 2}, {"n": 3}, {"n": 4}]
    assert semantic == [None, {"n": 1}, {"n": 2}]  # four entries: the least recently written namespace went


@pytest.mark.parametrize("name, expected", [("redis", RedisAnswerCache), ("memory", MemoryAnswerCache)])
def test_the_registry_builds_each_cache_from_settings(name, expected):
    settings = Settings(serve=ServeSettings(redis_url=REDIS_URL))

    async def scenario():
        cache = registry.resolve("answer_cache", name).from_settings(settings)
        await cache.ping()
        await cache.close()
        return cache

    assert isinstance(asyncio.run(scenario()), expected)
