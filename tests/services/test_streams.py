"""Streams of engine output: admitted by the gate before they start, metered exactly once
however they end (to the last item, closed early, cancelled), their slot always freed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kvaas.services.fairness import Admitted, EngineBusy, FairGate
from kvaas.services.streams import metered


class Engine:
    """Yields ``n`` items, one per step; counts how often it was started."""

    def __init__(self, n: int = 100, fail_at: int | None = None) -> None:
        self.n, self.fail_at, self.started = n, fail_at, 0

    async def stream(self) -> AsyncIterator[int]:
        self.started += 1
        for i in range(self.n):
            if i == self.fail_at:
                raise RuntimeError("engine failed")
            await asyncio.sleep(0)
            yield i


def _tasks() -> set[asyncio.Task[None]]:
    return set()


class Ledger:
    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.produced: list[int] = []
        self.records: list[int] = []
        self.hold = hold

    async def record(self) -> None:
        if self.hold is not None:
            await self.hold.wait()
        self.records.append(len(self.produced))


async def _start(
    gate: FairGate, engine: Engine, ledger: Ledger, pending: set[asyncio.Task[None]]
) -> Admitted[int]:
    items = metered(engine.stream(), ledger.produced.append, ledger.record, pending)
    return await gate.stream("t", items)


async def test_a_stream_read_to_its_end_is_metered_once() -> None:
    gate, ledger, pending = FairGate(4, 2), Ledger(), _tasks()
    it = await _start(gate, Engine(5), ledger, pending)
    assert gate.running_for("t") == 1  # admitted and started before it is returned
    assert [i async for i in it] == [0, 1, 2, 3, 4]
    assert ledger.records == [5] and gate.running == 0


async def test_a_stream_closed_early_pays_for_what_was_produced() -> None:
    gate, ledger, pending = FairGate(4, 2), Ledger(), _tasks()
    it = await _start(gate, Engine(), ledger, pending)
    got = [await anext(it), await anext(it), await anext(it)]
    await it.aclose()  # the client went away
    assert got == [0, 1, 2] and ledger.records == [3] and gate.running == 0


async def test_cancellation_does_not_lose_the_recording() -> None:
    hold = asyncio.Event()
    gate, ledger, pending = FairGate(4, 2), Ledger(hold), _tasks()
    it = await _start(gate, Engine(), ledger, pending)
    await anext(it)
    await anext(it)
    closing = asyncio.create_task(it.aclose())
    await asyncio.sleep(0.01)
    closing.cancel()  # the request's task is cancelled while the recording is under way
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert gate.running == 0 and len(pending) == 1  # the slot is free; the recording runs on
    hold.set()
    await asyncio.gather(*pending)
    assert ledger.records == [2]


async def test_a_refused_stream_never_starts_the_engine() -> None:
    gate, pending = FairGate(1, 1, max_queue=0), _tasks()
    busy = await _start(gate, Engine(), Ledger(), pending)  # holds the only slot
    engine, ledger = Engine(), Ledger()
    with pytest.raises(EngineBusy):
        await _start(gate, engine, ledger, pending)
    assert engine.started == 0 and ledger.records == [] and gate.running == 1
    await busy.aclose()
    assert gate.running == 0


async def test_a_failure_before_the_first_item_is_raised_at_the_start() -> None:
    gate, ledger, pending = FairGate(4, 2), Ledger(), _tasks()
    with pytest.raises(RuntimeError, match="engine failed"):
        await _start(gate, Engine(fail_at=0), ledger, pending)
    assert ledger.records == [] and gate.running == 0  # nothing produced, nothing owed
