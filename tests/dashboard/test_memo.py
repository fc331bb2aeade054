"""The dashboard's kept aggregates: computed once, served while fresh, refreshed in the
background once stale (the stale value served meanwhile), one computation at a time."""

from __future__ import annotations

import asyncio

from kvaas.dashboard.memo import Memo


async def test_kept_then_refreshed_in_the_background() -> None:
    now = [0.0]
    calls: list[int] = []
    release = asyncio.Event()

    async def compute() -> int:
        calls.append(len(calls) + 1)
        if len(calls) > 1:
            await release.wait()
        return len(calls)

    memo = Memo(ttl=60, clock=lambda: now[0])
    assert memo.peek("k", compute) is None and calls == []  # a page render never waits
    first, second = await asyncio.gather(memo.get("k", compute), memo.get("k", compute))
    assert first.value == second.value == 1 and calls == [1]  # computed once
    now[0] = 30
    assert (await memo.get("k", compute)).value == 1 and calls == [1]  # fresh
    now[0] = 61
    stale = await memo.get("k", compute)  # stale: served at once, refresh started
    assert stale.value == 1
    await asyncio.sleep(0)
    assert calls == [1, 2]
    assert (await memo.get("k", compute)).value == 1  # still running: no second refresh
    assert calls == [1, 2]
    release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert (await memo.get("k", compute)).value == 2


async def test_a_failed_computation_keeps_the_last_result() -> None:
    now = [0.0]
    fail = [False]

    async def compute() -> str:
        if fail[0]:
            raise RuntimeError("database down")
        return "ok"

    memo = Memo(ttl=1, clock=lambda: now[0])
    assert (await memo.get("k", compute)).value == "ok"
    fail[0] = True
    now[0] = 5
    assert (await memo.get("k", compute)).value == "ok"
    for _ in range(5):
        await asyncio.sleep(0)
    assert (await memo.get("k", compute)).value == "ok"


async def test_close_cancels_a_refresh_still_running() -> None:
    now = [0.0]
    cancelled = asyncio.Event()
    started = asyncio.Event()
    n = [0]

    async def compute() -> int:
        n[0] += 1
        if n[0] > 1:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return n[0]

    memo = Memo(ttl=1, clock=lambda: now[0])
    await memo.get("k", compute)
    now[0] = 5
    memo.peek("k", compute)
    await started.wait()
    await memo.close()
    assert cancelled.is_set()
