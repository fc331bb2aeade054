"""Redis going away mid-test (a TCP proxy in front of the real server is cut), or hanging: reads
keep serving from the other tiers, health says down, writes that need Redis fail fast with a
typed error, and everything recovers when Redis comes back.

"Fail fast" is checked on the failure mode, not on elapsed time (speed lives in
``bench/store.py``): once a call has found Redis down the circuit breaker is open, and every
later call is refused by the breaker without touching the network: no new connection, no new
failure recorded. The breakers here run on a hand-driven clock, so they stay open until the
test moves the clock past their retry time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from kvtest.services import REDIS_URL
from kvtest.tcpproxy import TcpProxy
from prometheus_client import REGISTRY
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvaas.store import RedisConnection, StorageFull, TieredStore, TierUnavailable
from kvaas.store.breaker import CircuitBreaker


class ManualClock:
    """A clock for :class:`CircuitBreaker` that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def held_breaker(clock: ManualClock) -> CircuitBreaker:
    return CircuitBreaker(base_delay=1.0, max_delay=1.0, probe_timeout=1.0, clock=clock)


def via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by ``127.0.0.1:port`` (credentials, database
    and options kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A proxy in front of the test Redis (``KVAAS_TEST_REDIS_URL``)."""
    target = urlsplit(REDIS_URL)
    p = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await p.start()
    yield p
    await p.stop()


async def wait_until_ok(store: TieredStore, clock: ManualClock | None = None) -> None:
    """Poll health until every tier is ok (moving ``clock`` past the breakers' retry time
    first); a generous bound only guards against a hang."""
    if clock is not None:
        clock.advance(60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(h.status == "ok" for h in (await store.health()).values()):
            return
        if clock is not None:
            clock.advance(60)
        await asyncio.sleep(0.05)
    raise AssertionError(f"store did not recover: {await store.health()}")


def refused_by_breaker(e: TierUnavailable) -> bool:
    """Whether the error came from the open breaker, not from a network call that failed (those
    chain the client's error)."""
    return e.__cause__ is None and "is down" in e.message


async def test_redis_cut_mid_test(
    proxy: TcpProxy,
    make_conn: Callable[..., RedisConnection],
    make_store: Callable[..., TieredStore],
    tenant: Any,
) -> None:
    clock = ManualClock()
    conn = make_conn(via(REDIS_URL, proxy.port), socket_timeout=1.0, breaker=held_breaker(clock))
    store = make_store(memory=None, conn=conn)
    await store.open()
    warm, cold = tenant.chunks(3), tenant.chunks(3, start=10)
    warm_keys, cold_keys = [k for k, _ in warm], [k for k, _ in cold]
    await store.put_manifest(tenant.manifest(warm_keys, "warm", storage_class="standard"))
    await store.put_chunks(warm, "standard")  # in Redis only
    await store.put_manifest(tenant.manifest(cold_keys, "cold", storage_class="cold"))
    await store.put_chunks(cold, "cold")  # on disk only
    assert conn.breaker.state == "closed" and conn.breaker.failures == 0

    await proxy.stop()  # Redis vanishes: open connections drop, new ones are refused

    assert await store.get_prefix(cold_keys) == [b for _, b in cold]  # disk keeps serving
    # that read found Redis gone: the breaker is open, and stays so (the clock stands still)
    assert conn.breaker.state == "open" and conn.breaker.failures >= 1
    failures = conn.breaker.failures
    assert await store.get_prefix(warm_keys) == []  # a miss, not an error
    assert await store.longest_prefix(cold_keys) == 3
    health = await store.health()
    assert health["redis"].status == "down" and health["index"].status == "down"
    assert health["disk"].status == "ok"
    assert REGISTRY.get_sample_value("kvaas_store_tier_up", {"tier": "redis"}) == 0
    with pytest.raises(TierUnavailable) as e:
        await store.put_chunks(tenant.chunks(1, start=20), "hot")
    assert e.value.status_code == 503 and e.value.tier == "redis"
    assert refused_by_breaker(e.value)
    with pytest.raises(TierUnavailable) as e:
        await store.put_manifest(tenant.manifest(cold_keys, "new", storage_class="cold"))
    assert refused_by_breaker(e.value)
    # standard overflows to disk when its Redis tier cannot take the write
    spill = tenant.chunks(1, start=30)
    assert await store.put_chunks(spill, "standard") == len(spill[0][1])
    # fail fast: every call after the first was refused by the breaker, none went to the network
    assert conn.breaker.state == "open" and conn.breaker.failures == failures

    await proxy.start()  # Redis is back: the breaker lets a probe through and closes
    await wait_until_ok(store, clock)
    assert conn.breaker.state == "closed"
    assert await store.put_chunks(tenant.chunks(1, start=20), "hot") > 0
    assert await store.get_prefix(warm_keys) == [b for _, b in warm]
    assert await store.get_prefix([k for k, _ in spill]) == [spill[0][1]]
    assert REGISTRY.get_sample_value("kvaas_store_tier_up", {"tier": "redis"}) == 1


async def test_hung_redis_times_out_with_a_typed_error(
    make_conn: Callable[..., RedisConnection], make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    """A server that accepts connections and never answers (not merely refused): the write
    that needs Redis ends in a timeout mapped to TierUnavailable, and later calls do not wait
    on the server again (no new connection to it)."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clock = ManualClock()
    try:
        conn = make_conn(
            f"redis://127.0.0.1:{port}/0",
            socket_timeout=0.3,
            connect_timeout=0.3,
            breaker=held_breaker(clock),
        )
        store = make_store(memory=1 << 20, conn=conn)
        await store.open()  # its eviction-policy check times out too, and is deferred
        conn.breaker = held_breaker(clock)  # closed again: the write below meets the server
        chunks = tenant.chunks(2)
        await store.tier("disk").put_many(chunks)
        with pytest.raises(TierUnavailable) as e:
            await store.put_chunks(tenant.chunks(1, start=5), "hot")
        assert e.value.tier == "redis" and e.value.status_code == 503
        # the server never answered: the call ended on a timeout (a socket timeout or the
        # overall deadline), not on a refused connection
        assert isinstance(e.value.__cause__, TimeoutError | RedisTimeoutError), e.value.__cause__
        assert conn.breaker.state == "open"
        failures, connections = conn.breaker.failures, len(held)
        assert connections >= 1
        # reads skip Redis now (the breaker is open: no second wait, no new connection)
        assert await store.get_prefix([k for k, _ in chunks]) == [b for _, b in chunks]
        with pytest.raises(TierUnavailable) as e:
            await store.put_chunks(tenant.chunks(1, start=6), "hot")
        assert refused_by_breaker(e.value)
        assert conn.breaker.failures == failures and len(held) == connections
        # a readiness probe goes out (it may open one connection) and reports down; one
        # right after it does not wait on the server again
        assert (await store.health())["redis"].status == "down"
        connections = len(held)
        assert (await store.health())["redis"].status == "down"
        assert len(held) == connections
        assert conn.breaker.failures == failures
    finally:
        server.close()
        for w in held:
            w.close()
        await server.wait_closed()


async def test_redis_killed_and_restarted(
    private_redis: Callable[..., Any],
    make_conn: Callable[..., RedisConnection],
    make_store: Callable[..., TieredStore],
    tenant: Any,
) -> None:
    """SIGKILL of a real redis-server (its data is gone), then a restart on the same port."""
    server = private_redis()
    clock = ManualClock()
    conn = make_conn(server.url, socket_timeout=1.0, breaker=held_breaker(clock))
    store = make_store(conn=conn)
    await store.open()
    chunks = tenant.chunks(2)
    keys = [k for k, _ in chunks]
    await store.put_manifest(tenant.manifest(keys, storage_class="cold"))
    await store.put_chunks(chunks, "cold")
    server.kill()
    assert await store.get_prefix(keys) == [b for _, b in chunks]
    assert conn.breaker.state == "open"
    failures = conn.breaker.failures
    with pytest.raises(TierUnavailable) as e:
        await store.put_chunks(tenant.chunks(1, start=9), "hot")
    assert refused_by_breaker(e.value) and conn.breaker.failures == failures
    assert (await store.health())["redis"].status == "down"
    server.start()
    await wait_until_ok(store, clock)
    assert await store.put_chunks(tenant.chunks(1, start=9), "hot") > 0


async def test_redis_out_of_memory_is_storage_full(
    private_redis: Callable[..., Any],
    make_conn: Callable[..., RedisConnection],
    make_store: Callable[..., TieredStore],
    tenant: Any,
) -> None:
    """Redis' OOM reply (its ``maxmemory`` is the tier's budget) is StorageFull; ``standard``
    then spills to disk while ``hot`` fails."""
    server = private_redis("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    store = make_store(memory=None, conn=make_conn(server.url))
    await store.open()
    # Redis refuses a write while its memory is over maxmemory, counting the request's own
    # buffer: after a large write's refusal, small ones may still fit; fill with those too
    for size, start, n in ((1 << 17, 0, 40), (1 << 10, 1000, 4000)):
        with pytest.raises(StorageFull):
            for i in range(n):
                await store.put_chunks(tenant.chunks(1, size=size, start=start + i), "hot")
    spill = tenant.chunks(1, size=1 << 17, start=100)
    assert await store.put_chunks(spill, "standard") == 1 << 17
    assert await store.tier("disk").exists_many([spill[0][0]]) == [True]
    assert (await store.health())["redis"].status == "ok"  # full is not down


async def test_gc_with_a_tier_down_retries_later(
    proxy: TcpProxy,
    make_conn: Callable[..., RedisConnection],
    make_store: Callable[..., TieredStore],
    tenant: Any,
) -> None:
    """A tier that cannot be cleaned makes the collector give the claim back: the chunks stay
    candidates and a later pass, with Redis back, deletes them everywhere."""
    conn = make_conn(via(REDIS_URL, proxy.port), socket_timeout=1.0)
    store = make_store(conn=conn, index="sqlite")
    await store.open()
    chunks = tenant.chunks(2)
    keys = [k for k, _ in chunks]
    m = tenant.manifest(keys, storage_class="standard")
    await store.put_manifest(m)
    await store.put_chunks(chunks, "standard")
    await store.delete_manifest(m.namespace_slot, m.cache_id, m.version)
    await proxy.stop()
    result = await store.collect_garbage()
    assert result.claimed == 2 and result.skipped_tiers == ["redis"]
    await proxy.start()
    await wait_until_ok(store)
    assert await store.exists_many(keys) == [True, True]  # still in Redis
    result = await store.collect_garbage()
    assert result.claimed == 2 and not result.skipped_tiers
    assert await store.exists_many(keys) == [False, False]


async def test_a_readiness_probe_closes_the_breaker_as_soon_as_redis_answers(
    private_redis: Callable[..., Any], make_conn: Callable[..., RedisConnection]
) -> None:
    """While the breaker refuses calls (a long delay), a readiness probe still goes out: while
    Redis is down it reports down without lengthening the delay; the first probe after Redis
    is back reports ok and closes the breaker, so calls pass again without waiting out the
    delay. (Before, ``/readyz`` reported a Redis that had failed over as down until the
    doubled delay ran out.)"""
    server = private_redis()
    clock = ManualClock()
    breaker = CircuitBreaker(base_delay=60.0, max_delay=60.0, clock=clock)
    conn = make_conn(server.url, socket_timeout=1.0, breaker=breaker)
    await conn.run(lambda c: c.ping())
    server.kill()
    with pytest.raises(TierUnavailable):
        await conn.run(lambda c: c.ping())
    assert (breaker.state, breaker.failures) == ("open", 1)
    retry_at = breaker.retry_at
    assert (await conn.ping()).status == "down"
    assert (breaker.state, breaker.failures, breaker.retry_at) == ("open", 1, retry_at)
    server.start()
    clock.advance(1.0)  # forced probes: at most one a second
    assert (await conn.ping()).status == "ok"
    assert breaker.state == "closed"
    assert await conn.run(lambda c: c.ping()) is True


async def test_a_connection_redis_py_lost_mid_command_is_an_outage() -> None:
    """redis-py's asyncio cluster client can send on a connection another task has just
    closed while a failed master's nodes are replaced; the library then raises
    ``AttributeError`` on the ``None`` writer (seen in the Redis Cluster failover test). That
    is the call meeting an outage: a typed ``TierUnavailable`` that the breaker counts, never
    an ``AttributeError`` escaping the store. One raised outside redis-py still propagates."""
    import redis.asyncio as aioredis

    clock = ManualClock()
    conn = RedisConnection(REDIS_URL, breaker=held_breaker(clock))
    try:

        async def closed_under_us(_client: Any) -> None:
            lost = aioredis.Connection()  # its writer is None, as after a close
            await lost._send_packed_command([b"PING\r\n"])

        with pytest.raises(TierUnavailable, match="lost a connection mid-command"):
            await conn.run(closed_under_us)
        assert conn.breaker.failures == 1

        async def our_bug(_client: Any) -> None:
            None.missing  # type: ignore[attr-defined]  # noqa: B018

        conn.breaker.record_success()
        with pytest.raises(AttributeError):
            await conn.run(our_bug)
        assert conn.breaker.failures == 0
    finally:
        await conn.close()
