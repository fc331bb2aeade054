"""Redis SIGKILLed under a steady load through a memory + Redis + disk store (index in Redis,
as the service runs it), then restarted empty on the same port.

While Redis is dead: reads of chunks with a copy in another tier (``cold`` caches on disk, a
``hot`` cache held by the memory tier) keep answering in full; reads of chunks only Redis held
are misses; writes fail with ``TierUnavailable`` (503) refused by the circuit breaker, without
waiting on the dead server. Never a wrong byte. After the restart the same store (no reopen,
no new process) serves and stores again; the caches Redis lost are reported lost by
:meth:`~kvaas.store.tiered.TieredStore.lost_chunks`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from kvaas.store import Manifest, RedisConnection, TieredStore
from kvaas.store.errors import TierUnavailable

WRITERS = 2
READERS = 4


async def test_redis_sigkill_under_load_and_recovery(
    private_redis: Callable[..., Any],
    make_conn: Callable[..., RedisConnection],
    make_store: Callable[..., TieredStore],
    tenant: Any,
) -> None:
    server = private_redis()
    conn = make_conn(server.url, socket_timeout=0.5, connect_timeout=0.2)
    store = make_store(memory=4 << 20, conn=conn, disk=32 << 20, encrypted=True)
    await store.open()
    sealer = tenant.sealer()

    async def create(cache_id: str, storage_class: str, start: int) -> tuple[Manifest, list[Any]]:
        chunks = tenant.chunks(4, size=4096, start=start)
        m = tenant.manifest([k for k, _ in chunks], cache_id=cache_id, storage_class=storage_class)
        await store.put_manifest(m)
        await store.put_chunks(chunks, storage_class, sealer)
        return m, chunks

    cold, cold_chunks = await create("cold", "cold", 0)  # on disk
    hot, hot_chunks = await create("hot", "hot", 10)  # Redis, and the memory tier once read
    std, std_chunks = await create("std", "standard", 20)  # Redis only (until read)
    assert await store.get_prefix(list(hot.chunk_keys), sealer) == [b for _, b in hot_chunks]
    expected = {m.cache_id: [b for _, b in c] for m, c in ((cold, cold_chunks), (hot, hot_chunks),
                                                            (std, std_chunks))}  # fmt: skip
    phase = "before"
    stats: Counter[tuple[str, str]] = Counter()
    wrong: list[str] = []
    stop = asyncio.Event()
    written = 0

    async def reader(m: Manifest) -> None:
        want = expected[m.cache_id]
        while not stop.is_set():
            at = phase
            got = await store.get_prefix(list(m.chunk_keys), sealer)
            at = at if at == phase else "transition"  # started in one phase, ended in another
            if got != want[: len(got)]:
                wrong.append(f"{m.cache_id} in phase {at}")
            stats[(at, f"{m.cache_id}:{'full' if len(got) == len(want) else 'partial'}")] += 1
            await asyncio.sleep(0)

    async def writer(w: int) -> None:
        nonlocal written
        i = 0
        while not stop.is_set():
            i += 1
            at = phase  # a write whose manifest committed before the kill may still succeed:
            # its standard chunks spill to disk. Counted in the phase it started in.
            try:
                await create(f"w{w}-{i}", "standard", 1000 + 100 * w + i)
            except TierUnavailable as e:  # refused by the open breaker, or a probe that failed
                at = at if at == phase else "transition"
                kind = "write:refused-fast" if "is down" in e.message else "write:probe"
                stats[(at, kind)] += 1
            else:
                at = at if at == phase else "transition"
                written += 1
                stats[(at, "write:ok")] += 1
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(reader(m)) for m in (cold, hot, cold)]
    tasks += [asyncio.create_task(writer(w)) for w in range(WRITERS)]
    try:

        async def until(cond: Callable[[], bool]) -> None:
            try:
                async with asyncio.timeout(60):
                    while not cond():  # noqa: ASYNC110 - counters, no event to wait on
                        await asyncio.sleep(0.01)
            except TimeoutError:
                raise AssertionError(f"stuck in phase {phase}: {dict(stats)}") from None

        await until(lambda: stats[("before", "write:ok")] >= 5)
        server.kill()
        phase = "down"
        tasks.append(asyncio.create_task(reader(std)))  # never read before: only Redis held it
        await until(lambda: stats[("down", "write:refused-fast")] >= 20 and
                    stats[("down", "std:partial")] >= 5)  # fmt: skip
        server.start()  # empty: no persistence, every Redis key is gone
        phase = "restarted"
        await until(lambda: stats[("restarted", "write:ok")] >= 5)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
    assert not wrong, wrong
    # while Redis was dead: the disk and memory copies kept serving in full, every time
    assert stats[("down", "cold:full")] > 0 and stats[("down", "cold:partial")] == 0
    assert stats[("down", "hot:full")] > 0 and stats[("down", "hot:partial")] == 0
    assert stats[("down", "std:full")] == 0  # only Redis held it: a miss (the engine recomputes)
    # writes failed fast: once the breaker opened, most were refused without touching Redis
    assert stats[("down", "write:ok")] == 0
    assert stats[("down", "write:refused-fast")] > stats[("down", "write:probe")]
    # recovered without reopening the store
    assert (await store.health())["redis"].status == "ok"
    assert (await store.lost_chunks(std)).lost  # Redis lost it: the service can say so
    assert (await store.lost_chunks(cold)).complete
