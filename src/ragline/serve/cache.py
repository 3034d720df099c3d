"""Answer caches: the same question (exact) or a close one (semantic) in the same scope gets the stored answer.

Every key and namespace holds the tenant, the caller's groups, the index
version and the fingerprint of the answering configuration: a changed index
or setup never serves an old answer, and no caller ever gets an answer built
from documents outside their scope. The Redis cache is shared by every server
process; the memory one serves a single process. A cache is only a shortcut:
when Redis fails or is slow, `get`/`nearest` miss and `put`/`remember` do
nothing (a warning every 30 s at most); `ping()` raises for /readyz.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import unicodedata
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from redis.asyncio import Redis

from ragline.serve.limits import RedisGuard, settings_client
from ragline.store.base import Scope

if TYPE_CHECKING:
    from ragline.config import Settings


class AnswerCache(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def put(self, key: str, value: dict[str, Any], ttl_s: int) -> None: ...

    async def nearest(self, namespace: str, vector: np.ndarray, threshold: float) -> dict[str, Any] | None:
        """The value of the stored vector most similar to `vector` if its cosine is >= threshold."""
        ...

    async def remember(
        self, namespace: str, vector: np.ndarray, value: dict[str, Any], ttl_s: int, max_entries: int
    ) -> None:
        """Store (vector, value) for `ttl_s`; the namespace keeps its newest `max_entries`."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


_LEADING = re.compile(r"^[\s\"'“”‘’«»¿¡]+")
_TRAILING = re.compile(r"[\s\"'“”‘’«»?!.,;:…]+$")
_SPACES = re.compile(r"\s+")


def normalise_question(question: str) -> str:
    """Casefold, collapse whitespace and strip sentence punctuation around it ("What is X?" = "  what is x ").

    Only quotes and sentence marks are stripped, so "C++?" and "C?" stay apart.
    """
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", question).casefold())
    return _TRAILING.sub("", _LEADING.sub("", text))


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def _scope_parts(scope: Scope) -> tuple[str, str | list[str]]:
    return scope.tenant, "all" if scope.groups is None else sorted(scope.groups)


def answer_key(question: str, scope: Scope, index_version: str, fingerprint: str) -> str:
    """The exact-cache key of a question asked in `scope` of index `index_version` (sha256 hex)."""
    return _digest("answer", normalise_question(question), *_scope_parts(scope), index_version, fingerprint)


def cache_namespace(scope: Scope, index_version: str, fingerprint: str) -> str:
    """The semantic-cache namespace: questions are compared only with others of the same scope and index."""
    return _digest("namespace", *_scope_parts(scope), index_version, fingerprint)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _best(matrix: np.ndarray, query: np.ndarray, threshold: float) -> int | None:
    """Row of the unit-vector `matrix` closest to unit `query`, if its cosine reaches `threshold`."""
    if not len(matrix):
        return None
    similarities = matrix @ query
    row = int(np.argmax(similarities))
    return row if similarities[row] >= threshold else None


# An entry's vector is stored as: expiry (epoch seconds, float64), dimension (uint32), float32 unit vector.
_HEADER = struct.Struct("<dI")

# KEYS: vectors hash, values hash, order list. ARGV: id, vector, value, ttl_s, max_entries.
# Adds one entry, drops the oldest beyond max_entries, and makes the whole namespace live ttl_s from now.
_REMEMBER = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local count = redis.call('RPUSH', KEYS[3], ARGV[1])
local excess = count - tonumber(ARGV[5])
if excess > 0 then
  local oldest = redis.call('LRANGE', KEYS[3], 0, excess - 1)
  redis.call('LTRIM', KEYS[3], excess, -1)
  redis.call('HDEL', KEYS[1], unpack(oldest))
  redis.call('HDEL', KEYS[2], unpack(oldest))
end
for _, key in ipairs(KEYS) do
  redis.call('EXPIRE', key, ARGV[4])
end
"""


class RedisAnswerCache:
    """Answers in Redis under `prefix`, shared by every server process.

    `client` is a redis.asyncio client returning bytes (the default:
    `decode_responses` off; build it with `ragline.serve.limits.redis_client`);
    `close()` closes it. A semantic namespace is three keys with one hash tag:
    the vectors (fetched whole in one round trip per lookup), the values
    (only the hit is fetched) and the order of arrival (for the cap).
    """

    def __init__(self, client: Redis, prefix: str = "ragline:cache:"):
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError(
                "the answer cache stores vectors as bytes: give it a Redis client with decode_responses off"
            )
        self.prefix = prefix
        self._client = client
        self._guard = RedisGuard(client, "answer cache")
        self._remember = client.register_script(_REMEMBER)

    @classmethod
    def from_settings(cls, settings: Settings, client: Redis | None = None) -> RedisAnswerCache:
        return cls(settings_client(settings, client, "answer cache"))

    def _keys(self, namespace: str) -> list[str]:
        base = f"{self.prefix}semantic:{{{namespace}}}:"
        return [base + "vectors", base + "values", base + "order"]

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self._guard.run(lambda: self._client.get(self.prefix + "exact:" + key), fallback=None)
        return None if raw is None else json.loads(raw)

    async def put(self, key: str, value: dict[str, Any], ttl_s: int) -> None:
        text = json.dumps(value)
        await self._guard.run(lambda: self._client.set(self.prefix + "exact:" + key, text, ex=ttl_s), fallback=None)

    async def nearest(self, namespace: str, vector: np.ndarray, threshold: float) -> dict[str, Any] | None:
        vectors_key, values_key, _ = self._keys(namespace)
        stored: dict[bytes, bytes] = await self._guard.run(lambda: self._client.hgetall(vectors_key), fallback={})
        query = _unit(vector)
        now = time.time()
        ids, rows = [], []
        for entry_id, packed in stored.items():
            expires_at, dimension = _HEADER.unpack_from(packed)
            if expires_at > now and dimension == query.size:
                ids.append(entry_id)
                rows.append(np.frombuffer(packed, dtype=np.float32, offset=_HEADER.size))
        row = _best(np.vstack(rows) if rows else np.empty((0, query.size), np.float32), query, threshold)
        if row is None:
            return None
        raw = await self._guard.run(lambda: self._client.hget(values_key, ids[row]), fallback=None)
        return None if raw is None else json.loads(raw)

    async def remember(
        self, namespace: str, vector: np.ndarray, value: dict[str, Any], ttl_s: int, max_entries: int
    ) -> None:
        unit = _unit(vector)
        packed = _HEADER.pack(time.time() + ttl_s, unit.size) + unit.tobytes()
        text = json.dumps(value)
        await self._guard.run(
            lambda: self._remember(
                keys=self._keys(namespace), args=[uuid.uuid4().hex, packed, text, ttl_s, max_entries]
            ),
            fallback=None,
        )

    async def ping(self) -> None:
        await self._guard.ping()

    async def close(self) -> None:
        await self._guard.close()


@dataclass(slots=True)
class _Namespace:
    entries: OrderedDict[str, tuple[float, np.ndarray, str]] = field(default_factory=OrderedDict)
    """id → (monotonic expiry, unit vector, value JSON), oldest first."""
    matrix: np.ndarray | None = None
    """The unit vectors stacked, rebuilt after a change."""


class MemoryAnswerCache:
    """Answers in this process, on the monotonic clock; at most `max_items` exact and `max_items` semantic entries.

    Values are kept as JSON text, so a caller changing a returned answer never
    changes the cached one. Past the bound, the oldest exact entries and the
    least recently written namespaces go first.
    """

    def __init__(self, max_items: int = 10000):
        self.max_items = max_items
        self._exact: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._namespaces: OrderedDict[str, _Namespace] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings, client: Redis | None = None) -> MemoryAnswerCache:
        return cls()

    async def get(self, key: str) -> dict[str, Any] | None:
        found = self._exact.get(key)
        if found is None:
            return None
        if found[0] <= time.monotonic():
            del self._exact[key]
            return None
        return json.loads(found[1])

    async def put(self, key: str, value: dict[str, Any], ttl_s: int) -> None:
        self._exact.pop(key, None)
        self._exact[key] = (time.monotonic() + ttl_s, json.dumps(value))
        while len(self._exact) > self.max_items:
            self._exact.popitem(last=False)

    async def nearest(self, namespace: str, vector: np.ndarray, threshold: float) -> dict[str, Any] | None:
        space = self._live(namespace)
        if space is None:
            return None
        query = _unit(vector)
        if space.matrix is None:
            space.matrix = np.vstack([unit for _, unit, _ in space.entries.values()])
        if space.matrix.shape[1] != query.size:
            return None
        row = _best(space.matrix, query, threshold)
        return None if row is None else json.loads(list(space.entries.values())[row][2])

    async def remember(
        self, namespace: str, vector: np.ndarray, value: dict[str, Any], ttl_s: int, max_entries: int
    ) -> None:
        unit = _unit(vector)
        space = self._live(namespace) or _Namespace()
        if space.entries and next(iter(space.entries.values()))[1].size != unit.size:
            space = _Namespace()  # vectors of another model: the old ones cannot be compared any more
        now = time.monotonic()
        space.entries[uuid.uuid4().hex] = (now + ttl_s, unit, json.dumps(value))
        while len(space.entries) > min(max_entries, self.max_items):
            space.entries.popitem(last=False)
        space.matrix = None
        self._namespaces.pop(namespace, None)
        self._namespaces[namespace] = space
        while sum(len(other.entries) for other in self._namespaces.values()) > self.max_items:
            self._namespaces.popitem(last=False)

    def _live(self, namespace: str) -> _Namespace | None:
        """The namespace without its expired entries; None (and forgotten) once none are left."""
        space = self._namespaces.get(namespace)
        if space is None:
            return None
        now = time.monotonic()
        live = OrderedDict((entry_id, entry) for entry_id, entry in space.entries.items() if entry[0] > now)
        if len(live) < len(space.entries):
            space.entries, space.matrix = live, None
        if not live:
            del self._namespaces[namespace]
            return None
        return space

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._exact.clear()
        self._namespaces.clear()
