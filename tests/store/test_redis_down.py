"""Redis going away mid-test (a TCP proxy in front of the real server is cut), or hanging: reads
keep serving from the other tiers, health says down, writes that need Redis fail fast with a
typed error, and everything recovers when Redis comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kvtest.tcpproxy import TcpProxy
from prometheus_client import REGISTRY

from kvaas.store import RedisConnection, StorageFull, TieredStore, TierUnavailable
from kvaas.store.breaker import CircuitBreaker


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    p = TcpProxy("127.0.0.1", 6379)
    await p.start()
    yield p
    await p.stop()


async def wait_until_ok(store: TieredStore, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(h.status == "ok" for h in (await store.health()).values()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"store did not recover: {await store.health()}")


async def test_redis_cut_mid_test(
    proxy: TcpProxy,
    make_conn: Callable[..., RedisConnection],
    make_store: Callable[..., TieredStore],
    tenant: Any,
) -> None:
    conn = make_conn(f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=1.0)
    store = make_store(memory=None, conn=conn)
    await store.open()
    warm, cold = tenant.chunks(3), tenant.chunks(3, start=10)
    warm_keys, cold_keys = [k for k, _ in warm], [k for k, _ in cold]
    await store.put_manifest(tenant.manifest(warm_keys, "warm", storage_class="standard"))
    await store.put_chunks(warm, "standard")  # in Redis only
    await store.put_manifest(tenant.manifest(cold_keys, "cold", storage_class="cold"))
    await store.put_chunks(cold, "cold")  # on disk only

    await proxy.stop()  # Redis vanishes: open connections drop, new ones are refused

    t0 = time.monotonic()
    assert await store.get_prefix(cold_keys) == [b for _, b in cold]  # disk keeps serving
    assert await store.get_prefix(warm_keys) == []  # a miss, not an error
    assert await store.longest_prefix(cold_keys) == 3
    health = await store.health()
    assert health["redis"].status == "down" and health["index"].status == "down"
    assert health["disk"].status == "ok"
    assert REGISTRY.get_sample_value("kvaas_store_tier_up", {"tier": "redis"}) == 0
    with pytest.raises(TierUnavailable) as e:
        await store.put_chunks(tenant.chunks(1, start=20), "hot")
    assert e.value.status_code == 503 and e.value.tier == "redis"
    with pytest.raises(TierUnavailable):
        await store.put_manifest(tenant.manifest(cold_keys, "new", storage_class="cold"))
    # standard overflows to disk when its Redis tier cannot take the write
    spill = tenant.chunks(1, start=30)
    assert await store.put_chunks(spill, "standard") == len(spill[0][1])
    assert time.monotonic() - t0 < 3.0  # fail fast: no hangs, no long retry loops

    await proxy.start()  # Redis is back: the breaker lets a probe through and closes
    await wait_until_ok(store)
    assert await store.put_chunks(tenant.chunks(1, start=20), "hot") > 0
    assert await store.get_prefix(warm_keys) == [b for _, b in warm]
    assert await store.get_prefix([k for k, _ in spill]) == [spill[0][1]]
    assert REGISTRY.get_sample_value("kvaas_store_tier_up", {"tier": "redis"}) == 1


async def test_hung_redis_times_out_with_a_typed_error(
    make_conn: Callable[..., RedisConnection], make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    """A server that accepts connections and never answers (not merely refused)."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = make_conn(
            f"redis://127.0.0.1:{port}/0",
            socket_timeout=0.3,
            connect_timeout=0.3,
            breaker=CircuitBreaker(base_delay=5.0),
        )
        store = make_store(memory=1 << 20, conn=conn)
        await store.open()
        chunks = tenant.chunks(2)
        await store.tier("disk").put_many(chunks)
        t0 = time.monotonic()
        with pytest.raises(TierUnavailable):
            await store.put_chunks(tenant.chunks(1, start=5), "hot")
        assert time.monotonic() - t0 < 2.0
        # reads skip it (the breaker is open now: no second wait)
        t0 = time.monotonic()
        assert await store.get_prefix([k for k, _ in chunks]) == [b for _, b in chunks]
        assert time.monotonic() - t0 < 1.0
        assert (await store.health())["redis"].status == "down"
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
    store = make_store(conn=make_conn(server.url, socket_timeout=1.0))
    await store.open()
    chunks = tenant.chunks(2)
    keys = [k for k, _ in chunks]
    await store.put_manifest(tenant.manifest(keys, storage_class="cold"))
    await store.put_chunks(chunks, "cold")
    server.kill()
    t0 = time.monotonic()
    assert await store.get_prefix(keys) == [b for _, b in chunks]
    with pytest.raises(TierUnavailable):
        await store.put_chunks(tenant.chunks(1, start=9), "hot")
    assert time.monotonic() - t0 < 3.0
    assert (await store.health())["redis"].status == "down"
    server.start()
    await wait_until_ok(store)
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
    with pytest.raises(StorageFull):
        for i in range(40):
            await store.put_chunks(tenant.chunks(1, size=1 << 17, start=i), "hot")
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
    conn = make_conn(f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=1.0)
    store = make_store(conn=conn, index="sqlite")
    await store.open()
    chunks = tenant.chunks(2)
    keys = [k for k, _ in chunks]
    m = tenant.manifest(keys, storage_class="standard")
    await store.put_manifest(m)
    await store.put_chunks(chunks, "standard")
    await store.delete_manifest(m.namespace_tag, m.cache_id, m.version)
    await proxy.stop()
    result = await store.collect_garbage()
    assert result.claimed == 2 and result.skipped_tiers == ["redis"]
    await proxy.start()
    await wait_until_ok(store)
    assert await store.exists_many(keys) == [True, True]  # still in Redis
    result = await store.collect_garbage()
    assert result.claimed == 2 and not result.skipped_tiers
    assert await store.exists_many(keys) == [False, False]
