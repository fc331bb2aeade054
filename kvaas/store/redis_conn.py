"""One Redis (standalone or Cluster) connection shared by the Redis tier and the Redis
reference index: client construction, key naming, timeouts, error mapping and the breaker.

Every call goes through :meth:`RedisConnection.run`, which

- refuses at once with :class:`~kvaas.store.errors.TierUnavailable` while the circuit breaker is
  open (Redis was found down less than the back-off delay ago); calls that were in flight when
  it opened do not lengthen its delay (one dead node is one outage, however many calls it cut);
- bounds the call by an overall deadline (socket timeouts cover each read; the deadline covers
  the whole batch, scaled by the bytes moved), so an unreachable Redis never hangs a caller;
- maps connection errors and timeouts to ``TierUnavailable`` (opening the breaker), Redis' OOM
  reply to :class:`~kvaas.store.errors.StorageFull`, and other server errors to
  :class:`~kvaas.store.errors.StoreError`.

Key layout (``prefix`` defaults to ``kvaas``; ``slot`` is the namespace slot, so everything
of one tenant hashes to one Redis Cluster slot)::

    <prefix>:{<slot>}:c:<key hex>                  chunk blob
    <prefix>:{<slot>}:b                            bytes of chunk blobs under this slot
    <prefix>:{<slot>}:r:<key hex>                  reference counts (hash: hot/standard/cold)
    <prefix>:{<slot>}:t:<key hex>                  GC tombstone (chunk being collected)
    <prefix>:{<slot>}:z                            GC candidates (zset: key hex → time unreferenced)
    <prefix>:{<slot>}:m:<cache id>:<version>       manifest (JSON)
    <prefix>:{<slot>}:v:<cache id>                 stored versions of a cache (zset: score=version)
    <prefix>:gc-slots                              slots that may have GC candidates (set)
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvaas.redact import redact_url
from kvaas.store.breaker import CircuitBreaker
from kvaas.store.errors import ConfigurationError, StorageFull, StoreError, TierUnavailable
from kvaas.store.keys import SLOT_BYTES, ChunkKey
from kvaas.store.tier import TierHealth

T = TypeVar("T")
RedisClient = aioredis.Redis | RedisCluster

_PREFIX = re.compile(r"^[A-Za-z0-9_.\-:]{1,64}$")
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    RedisClusterException,
    TimeoutError,
    OSError,
)
_REDIS_PY = os.path.dirname(redis.__file__) + os.sep


def _raised_in_redis_py(e: BaseException) -> bool:
    """Whether ``e`` was raised inside redis-py's own code. Its asyncio cluster client can
    use a connection another task has just closed while a failed master's node objects are
    replaced (an ``AttributeError`` on a ``None`` reader or writer): that call met an outage,
    as with a refused connection; it is not a fault of the caller's."""
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and last.tb_frame.f_code.co_filename.startswith(_REDIS_PY)


MIN_RATE_BYTES_PER_S = 50e6
#: Readiness probes that go out while the breaker refuses calls: at most one per this period.
PROBE_INTERVAL_S = 1.0
"""Slowest transfer rate a healthy Redis is expected to sustain (sets per-batch deadlines)."""


class RedisKeys:
    """Builds the Redis key names of one deployment (see the module docstring)."""

    def __init__(self, prefix: str = "kvaas") -> None:
        if not _PREFIX.match(prefix) or "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"invalid Redis key prefix {prefix!r}")
        self.prefix = prefix

    def slot_base(self, slot: str) -> str:
        return f"{self.prefix}:{{{slot}}}:"

    def chunk(self, key: ChunkKey) -> str:
        h = key.hex()
        return f"{self.prefix}:{{{h[: 2 * SLOT_BYTES]}}}:c:{h}"

    def refs(self, key: ChunkKey) -> str:
        h = key.hex()
        return f"{self.prefix}:{{{h[: 2 * SLOT_BYTES]}}}:r:{h}"

    def tombstone(self, key: ChunkKey) -> str:
        h = key.hex()
        return f"{self.prefix}:{{{h[: 2 * SLOT_BYTES]}}}:t:{h}"

    def counter(self, slot: str) -> str:
        return f"{self.prefix}:{{{slot}}}:b"

    def garbage(self, slot: str) -> str:
        return f"{self.prefix}:{{{slot}}}:z"

    def manifest(self, slot: str, cache_id: str, version: int) -> str:
        return f"{self.prefix}:{{{slot}}}:m:{cache_id}:{version}"

    def versions(self, slot: str, cache_id: str) -> str:
        return f"{self.prefix}:{{{slot}}}:v:{cache_id}"

    def manifest_pattern(self, slot: str, cache_id: str) -> str:
        return f"{self.prefix}:{{{slot}}}:m:{cache_id}:*"

    def gc_slots(self) -> str:
        return f"{self.prefix}:gc-slots"

    def chunk_pattern(self) -> str:
        return f"{self.prefix}:{{*}}:c:*"

    def counter_pattern(self) -> str:
        return f"{self.prefix}:{{*}}:b"

    @staticmethod
    def key_of_chunk_name(name: bytes | str) -> ChunkKey:
        text = name.decode() if isinstance(name, bytes) else name
        return ChunkKey(bytes.fromhex(text.rsplit(":", 1)[1]))


def group_by_slot(keys: Iterable[ChunkKey]) -> dict[str, list[int]]:
    """Positions of ``keys`` grouped by slot (one Redis Cluster slot per group)."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k[:SLOT_BYTES].hex(), []).append(i)
    return groups


class RedisConnection:
    """A Redis or Redis Cluster client with fail-fast semantics (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        prefix: str = "kvaas",
        socket_timeout: float = 2.0,
        connect_timeout: float = 0.5,
        name: str = "redis",
        breaker: CircuitBreaker | None = None,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.cluster = cluster
        self.name = name
        self.keys = RedisKeys(prefix)
        self.socket_timeout = socket_timeout
        self.breaker = breaker or CircuitBreaker()
        self._closed = False
        self._probing = False
        self._last_probe = float("-inf")
        self._initialized = not cluster
        self._init_lock = asyncio.Lock()
        common: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 1),  # one immediate retry: a stale pooled connection
            "decode_responses": False,
            "max_connections": max_connections,
        }
        self.client: RedisClient
        try:
            if cluster:
                self.client = RedisCluster.from_url(url, **common)
            else:
                self.client = aioredis.Redis.from_url(url, **common)
        except (ValueError, RedisError) as e:
            raise ConfigurationError(f"invalid Redis URL {url!r}: {e}") from e

    def deadline(self, nbytes: int = 0) -> float:
        """Overall time allowed for one call moving ``nbytes`` bytes."""
        return 2 * self.socket_timeout + nbytes / MIN_RATE_BYTES_PER_S

    async def run(
        self, op: Callable[[RedisClient], Awaitable[T]], *, nbytes: int = 0, probe: bool = False
    ) -> T:
        """Run ``op(client)`` under the breaker and a deadline; map errors to store errors.

        ``probe``: go out even while the breaker refuses calls (a readiness probe): its success
        closes the breaker at once, its failure is the outage already counted (the breaker's
        delay is left as it is)."""
        allowed = self.breaker.allow()
        if not allowed and not probe:
            raise TierUnavailable(
                self.name,
                f"Redis tier {self.name!r} is down ({self.breaker.last_error}); next probe in "
                f"{self.breaker.seconds_until_retry():.1f}s",
            )
        # a failure after the breaker reopened is old news; a forced probe's failure too
        generation = self.breaker.generation if allowed else -1
        try:
            async with asyncio.timeout(self.deadline(nbytes)):
                if not self._initialized:
                    await self._initialize()
                result = await op(self.client)
        except OutOfMemoryError as e:
            self.breaker.record_success()
            raise StorageFull(self.name, f"Redis tier {self.name!r}: {e}") from e
        except _UNAVAILABLE as e:
            self.breaker.record_failure(e, generation)
            raise TierUnavailable(
                self.name, f"Redis tier {self.name!r} is unreachable: {e or type(e).__name__}"
            ) from e
        except ResponseError as e:
            self.breaker.record_success()
            raise StoreError(f"Redis tier {self.name!r}: {e}") from e
        except RedisError as e:
            self.breaker.record_failure(e, generation)
            raise TierUnavailable(self.name, f"Redis tier {self.name!r}: {e}") from e
        except AttributeError as e:
            if not _raised_in_redis_py(e):
                raise
            self.breaker.record_failure(e, generation)
            raise TierUnavailable(
                self.name, f"Redis tier {self.name!r} lost a connection mid-command: {e}"
            ) from e
        self.breaker.record_success()
        return result

    async def _initialize(self) -> None:
        # A cluster client learns the slot map on first use. Left to itself, every concurrent
        # first command starts that discovery and each replaces the node objects, closing
        # connections other commands are using (a race in redis-py's asyncio cluster client
        # that surfaces as AttributeError on a None socket). Discover once, serially.
        async with self._init_lock:
            if not self._initialized:
                await self.client.initialize()
                self._initialized = True

    async def pipelined(self, build: Callable[[Any], None], *, nbytes: int = 0) -> list[Any]:
        """Queue commands with ``build(pipe)`` and send them in one round trip (per node in a
        cluster); return the replies in order."""

        async def op(client: RedisClient) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            build(pipe)
            return list(await pipe.execute())

        return await self.run(op, nbytes=nbytes)

    async def scan_keys(self, pattern: str, count: int = 1000) -> list[bytes]:
        """All key names matching ``pattern`` (every primary of a cluster). Maintenance only:
        one bounded call per ``SCAN`` step, so a large keyspace cannot trip the deadline."""
        client = self.client
        out: list[bytes] = []
        nodes: list[Any] = [None]
        if isinstance(client, RedisCluster):
            await self.run(lambda c: c.initialize())  # no-op once the slot map is known
            nodes = client.get_primaries()
        for node in nodes:
            cursor = 0
            while True:
                extra = {} if node is None else {"target_nodes": node}

                async def step(c: RedisClient, cursor: int = cursor, extra: Any = extra) -> Any:
                    return await c.scan(cursor, match=pattern, count=count, **extra)

                cursor, batch = await self.run(step)
                if isinstance(cursor, dict):  # a cluster client answers {node name: cursor}
                    cursor = next(iter(cursor.values()), 0)
                out.extend(batch)
                if int(cursor) == 0:
                    break
        return out

    async def ping(self) -> TierHealth:
        """Probe Redis, even while the breaker is open: readiness reports Redis as it is now,
        and a successful probe closes the breaker as soon as Redis answers again (after a
        failover, not a doubled delay later)."""
        # one forced probe at a time, at most one a second: a hung Redis costs each a deadline
        now = self.breaker.now()
        force = not self._probing and now - self._last_probe >= PROBE_INTERVAL_S
        if force:
            self._probing, self._last_probe = True, now
        try:
            await self.run(lambda c: c.ping(), probe=force)
        except TierUnavailable as e:
            return TierHealth("down", e.message)
        except StoreError as e:
            return TierHealth("down", e.message)
        finally:
            if force:
                self._probing = False
        kind = "cluster" if self.cluster else "standalone"
        return TierHealth("ok", f"{kind} Redis at {redact_url(self.url)}")

    async def close(self) -> None:
        """Close the client's connections (idempotent: the tier and the index share it)."""
        if not self._closed:
            self._closed = True
            await self.client.aclose()


def chunked(seq: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
