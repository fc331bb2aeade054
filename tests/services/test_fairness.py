"""The engine gate: per-tenant caps, round-robin turns between tenants, bounded queues and
waits, and no slot leaked by cancellation."""

from __future__ import annotations

import asyncio

import pytest

from kvaas.engine.priorities import ALONE, ENGINE_PRIORITY, INTERACTIVE, SHARED
from kvaas.services.fairness import EngineBusy, FairGate


async def _hold(gate: FairGate, tenant: str, log: list[str], release: asyncio.Event) -> None:
    async with gate.slot(tenant):
        log.append(tenant)
        await release.wait()


async def test_caps_and_round_robin_between_tenants() -> None:
    gate = FairGate(capacity=2, per_tenant=2)
    log: list[str] = []
    release = {n: asyncio.Event() for n in range(12)}
    # tenant a floods: 10 requests; b and c arrive after with one each
    tasks = [asyncio.create_task(_hold(gate, "a", log, release[i])) for i in range(10)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(_hold(gate, t, log, release[10 + i])) for i, t in enumerate("bc")]
    await asyncio.sleep(0.01)
    assert log == ["a", "a"] and gate.running == 2 and gate.queued("a") == 8
    # each freed slot goes to the next tenant in turn, not to a's backlog
    release[0].set()
    await asyncio.sleep(0.01)
    release[1].set()
    await asyncio.sleep(0.01)
    assert log[2:] == ["b", "c"] or log[2:] == ["c", "b"], log
    for e in release.values():
        e.set()
    await asyncio.gather(*tasks)
    assert log.count("a") == 10 and gate.running == 0 and gate.queued() == 0


async def test_per_tenant_cap_leaves_room_for_others() -> None:
    gate = FairGate(capacity=4, per_tenant=1)
    log: list[str] = []
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_hold(gate, "a", log, stop)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert log == ["a"] and gate.queued("a") == 4
    tasks.append(asyncio.create_task(_hold(gate, "b", log, stop)))
    await asyncio.sleep(0.01)
    assert log == ["a", "b"]  # b runs at once: a is at its own cap, capacity is free
    stop.set()
    await asyncio.gather(*tasks)


async def test_queue_limit_and_wait_limit_refuse_with_retry_after() -> None:
    gate = FairGate(capacity=1, per_tenant=1, max_queue=2, max_wait_s=0.05)
    stop = asyncio.Event()
    holder = asyncio.create_task(_hold(gate, "a", [], stop))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(_hold(gate, "a", [], stop)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(EngineBusy) as busy:
        async with gate.slot("a"):
            pass
    assert busy.value.status_code == 429 and "Retry-After" in busy.value.headers
    # the queued ones give up after max_wait_s, and leave nothing behind
    for w in waiters:
        with pytest.raises(EngineBusy):
            await w
    assert gate.queued() == 0 and gate.running == 1
    stop.set()
    await holder
    assert gate.running == 0


async def test_cancelled_waiters_and_holders_leak_no_slot() -> None:
    gate = FairGate(capacity=1, per_tenant=1)
    stop = asyncio.Event()
    holder = asyncio.create_task(_hold(gate, "a", [], stop))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(_hold(gate, "b", [], stop))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.queued() == 0
    holder.cancel()  # a client that disconnects while its request runs
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert gate.running == 0
    async with gate.slot("c"):
        assert gate.running == 1


def test_admission_refuses_a_tenant_whose_slots_and_queue_are_taken() -> None:
    gate = FairGate(capacity=8, per_tenant=2, max_queue=1)
    with gate.admit("a"), gate.admit("a"), gate.admit("a"):
        assert gate.admitted("a") == 3
        with pytest.raises(EngineBusy) as refused, gate.admit("a"):
            pass
        assert refused.value.headers == {"Retry-After": "1"}
        assert "2 run at once now, 1 wait" in refused.value.message
        with gate.admit("b"):  # another tenant is admitted meanwhile
            assert gate.admitted("b") == 1
    assert gate.admitted("a") == 0 and gate.admitted("b") == 0
    with gate.admit("a"):  # an answered request frees its admission, an error included
        pass
    with pytest.raises(RuntimeError), gate.admit("a"):
        raise RuntimeError("the route failed")
    assert gate.admitted("a") == 0


async def test_admission_counts_the_shared_cap_while_another_tenant_is_active() -> None:
    """A tenant held to its shared cap finds its queue full after ``shared + max_queue``
    requests, not ``per_tenant + max_queue``: admission refuses the next one on arrival
    (before its route's database writes), not in the queue after them."""
    gate = FairGate(capacity=8, per_tenant=4, per_tenant_shared=1, max_queue=2, active_s=5)
    stop = asyncio.Event()
    b = asyncio.create_task(_hold(gate, "b", [], stop))  # another tenant is active
    await asyncio.sleep(0.01)

    async def admitted(log: list[str]) -> None:
        with gate.admit("a"):
            await _hold(gate, "a", log, stop)

    log: list[str] = []
    a = [asyncio.create_task(admitted(log)) for _ in range(3)]  # 1 runs, 2 wait
    await asyncio.sleep(0.01)
    assert gate.running_for("a") == 1 and gate.queued("a") == 2
    refused = gate.refusal("a")
    assert refused is not None and "1 run at once now, 2 wait" in refused.message
    with pytest.raises(EngineBusy), gate.admit("a"):
        pass
    stop.set()
    await asyncio.gather(b, *a)
    assert log == ["a"] * 3 and gate.refusal("a") is None


async def test_a_tenant_is_held_to_its_shared_cap_while_another_is_active() -> None:
    gate = FairGate(capacity=8, per_tenant=3, per_tenant_shared=1, active_s=0.2)
    log: list[str] = []
    stop = {i: asyncio.Event() for i in range(6)}
    a = [asyncio.create_task(_hold(gate, "a", log, stop[i])) for i in range(5)]
    await asyncio.sleep(0.01)
    assert gate.running_for("a") == 3 and gate.cap("a") == 3  # alone: its full cap
    b_stop = asyncio.Event()
    b = asyncio.create_task(_hold(gate, "b", log, b_stop))
    await asyncio.sleep(0.01)
    assert gate.running_for("b") == 1  # admitted at once beside a's three
    assert gate.cap("a") == 1 and gate.cap("b") == 1
    stop[0].set()
    stop[1].set()
    await asyncio.sleep(0.01)
    assert gate.running_for("a") == 1 and gate.queued("a") == 2  # no new slot above 1
    b_stop.set()
    await b
    await asyncio.sleep(0.01)
    assert gate.running_for("a") == 1  # b stays active for a while after its request
    await asyncio.sleep(0.3)  # b's activity lapsed: a gets its full cap back, no release needed
    assert gate.running_for("a") == 3 and gate.queued("a") == 0
    for e in stop.values():
        e.set()
    await asyncio.gather(*a)
    assert gate.running == 0


def test_gate_from_settings_holds_tenants_to_the_shared_cap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvaas.config import Settings

    s = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        tenant_max_inflight=4,
        tenant_max_inflight_shared=2,
        tenant_active_seconds=1.5,
    )
    gate = FairGate.from_settings(s)
    assert (gate.per_tenant, gate.per_tenant_shared, gate.active_s) == (4, 2, 1.5)


async def _priority_in(
    gate: FairGate, tenant: str, out: list[tuple[str, int, int]], stop: asyncio.Event
) -> None:
    async with gate.slot(tenant) as granted:
        out.append((tenant, granted, ENGINE_PRIORITY.get()))  # what an engine submits with
        await stop.wait()


async def test_slots_carry_the_engine_priority_of_their_request() -> None:
    gate = FairGate(capacity=8, per_tenant=4, per_tenant_shared=4, active_s=60)
    got: list[tuple[str, int, int]] = []
    stop = asyncio.Event()
    with gate.admit("a"):
        first = asyncio.create_task(_priority_in(gate, "a", got, stop))
        await asyncio.sleep(0.01)
    assert got == [("a", INTERACTIVE, INTERACTIVE)]  # its tenant's lone request
    second = asyncio.create_task(_priority_in(gate, "a", got, stop))
    await asyncio.sleep(0.01)
    assert got[1] == ("a", ALONE, ALONE)  # a's second, nobody else about
    other = asyncio.create_task(_priority_in(gate, "b", got, stop))
    await asyncio.sleep(0.01)
    assert got[2] == ("b", INTERACTIVE, INTERACTIVE)
    third = asyncio.create_task(_priority_in(gate, "a", got, stop))
    await asyncio.sleep(0.01)
    assert got[3] == ("a", SHARED, SHARED)  # bulk work beside b's
    stop.set()
    await asyncio.gather(first, second, other, third)
    assert ENGINE_PRIORITY.get() == INTERACTIVE  # the block's priority does not outlive it


async def test_a_request_admitted_beside_others_of_its_tenant_is_not_interactive() -> None:
    gate = FairGate(capacity=8, per_tenant=4, active_s=60)
    got: list[tuple[str, int, int]] = []
    stop = asyncio.Event()
    with gate.admit("a"), gate.admit("a"):  # another request of a is on its way
        task = asyncio.create_task(_priority_in(gate, "a", got, stop))
        await asyncio.sleep(0.01)
        stop.set()
        await task
    assert got == [("a", ALONE, ALONE)]


async def test_a_queued_request_gets_its_priority_when_granted() -> None:
    gate = FairGate(capacity=1, per_tenant=1, active_s=60)
    got: list[tuple[str, int, int]] = []
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(_priority_in(gate, "a", got, stop_a))
    await asyncio.sleep(0.01)
    b = asyncio.create_task(_priority_in(gate, "b", got, stop_b))
    await asyncio.sleep(0.01)
    assert gate.queued("b") == 1
    stop_a.set()
    await a
    await asyncio.sleep(0.01)
    assert got == [("a", INTERACTIVE, INTERACTIVE), ("b", INTERACTIVE, INTERACTIVE)]
    stop_b.set()
    await b
