"""Fair sharing of the engine between tenants: a cap per tenant, round-robin between them.

The engine batches whatever it is given, so without a gate one tenant's burst fills every
batch and every other tenant's request waits behind it. :class:`FairGate` admits at most
``capacity`` engine requests at a time (all tenants together) and at most ``per_tenant`` of any
one tenant. When a slot frees, it goes to the *next tenant in turn* that has a request waiting
(among the tenants waiting, the one served least recently; first-come first-served within a
tenant), so a tenant with a deep queue gets no more turns than a tenant with a single request:
its excess waits in its own queue, not in front of others.

A tenant alone on the engine may run ``per_tenant`` requests at once; while *another* tenant is
active (it has a request running or waiting, or had one within the last ``active_s`` seconds,
so a client sending one request after the other stays active between them) it may run only
``per_tenant_shared``. On an engine whose compute every request in a batch shares (a CPU, or a
GPU near saturation), each extra request of a busy neighbour lengthens every step of everyone
else's: holding a tenant to its shared cap while others work is what keeps their latency near
what it is alone; when it is alone again it gets its full cap back. Slots it already holds are
never taken back: it drops to the shared cap as they finish.

Slots also carry a priority to the engine (:mod:`kvaas.engine.priorities`): a tenant's lone
request is ``INTERACTIVE``; one of several while another tenant is active is ``SHARED``, and
the engine's step scheduler (:mod:`kvaas.engine.scheduler`) holds ``SHARED`` prefill back
while an interactive request runs and keeps its steps short otherwise. The gate bounds how many
requests a busy tenant runs; the scheduler keeps the few it runs from lengthening a quieter
tenant's steps.

A request that would make its tenant's queue longer than ``max_queue`` is refused at once, and
one that waits longer than ``max_wait_s`` gives up: both raise :class:`EngineBusy`
(``429 engine_busy`` with ``Retry-After``). The API refuses a tenant's excess *before* any of
its work: each request bound for the engine is admitted (:meth:`FairGate.admit`) as it
arrives, and one that would find the tenant's slots and queue all taken is refused there, so a
tenant far over its limits costs the gateway one counter check per excess request, not the
database writes and tokenizing its requests would do before reaching the queue. Cancellation
(a client that disconnects) removes the waiter or releases its slot; slots are never leaked.

One gate serves one gateway process (the engine it guards is in or behind that process): the
application builds it from the settings (:meth:`FairGate.from_settings`) and hands it to the
cache service, whose every engine request (prefill, attach, completion) holds a slot while the
engine works on it; a stream holds its slot until it ends or its client goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kvaas.config import Settings
from kvaas.engine.priorities import ALONE, ENGINE_PRIORITY, INTERACTIVE, SHARED
from kvaas.errors import APIError
from kvaas.services.streams import aclose

T = TypeVar("T")


class EngineBusy(APIError):
    status_code = 429
    type = "engine_busy"
    description = "The tenant has as many engine requests running and queued as it may."


@dataclass
class _Tenant:
    running: int = 0
    waiting: deque[asyncio.Future[int]] = field(default_factory=deque)
    last_served: int = -1  # grant number of its latest slot (-1: none since it was idle)


class FairGate:
    """Admission to the engine: ``capacity`` in all, ``per_tenant`` per tenant, fair turns."""

    def __init__(
        self,
        capacity: int,
        per_tenant: int,
        *,
        max_queue: int = 64,
        max_wait_s: float = 60.0,
        per_tenant_shared: int | None = None,
        active_s: float = 2.0,
    ) -> None:
        if (
            capacity < 1
            or per_tenant < 1
            or (per_tenant_shared is not None and per_tenant_shared < 1)
        ):
            raise ValueError("capacity and the per-tenant caps must be at least 1")
        self.capacity = capacity
        self.per_tenant = per_tenant
        self.per_tenant_shared = min(per_tenant_shared or per_tenant, per_tenant)
        self.active_s = active_s
        self._last_active: dict[str, float] = {}  # tenant -> when it last held or freed a slot
        self._wakeup: asyncio.TimerHandle | None = None
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._running = 0
        self._grants = 0
        # tenants with waiters, in turn order (the next to serve first)
        self._turns: OrderedDict[str, _Tenant] = OrderedDict()
        self._tenants: dict[str, _Tenant] = {}
        self._admitted: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, settings: Settings) -> FairGate:
        """The gate the settings describe (``engine_max_inflight``, ``tenant_max_inflight``,
        ``tenant_max_inflight_shared``, ``tenant_active_seconds``, ``tenant_max_queued``,
        ``engine_queue_timeout_seconds``)."""
        return cls(
            settings.engine_max_inflight,
            settings.tenant_max_inflight,
            max_queue=settings.tenant_max_queued,
            max_wait_s=settings.engine_queue_timeout_seconds,
            per_tenant_shared=settings.tenant_max_inflight_shared,
            active_s=settings.tenant_active_seconds,
        )

    @property
    def running(self) -> int:
        return self._running

    def running_for(self, tenant_id: str) -> int:
        """Slots ``tenant_id`` holds."""
        t = self._tenants.get(tenant_id)
        return t.running if t else 0

    def queued(self, tenant_id: str | None = None) -> int:
        """Requests waiting (of one tenant, or of all)."""
        if tenant_id is not None:
            t = self._tenants.get(tenant_id)
            return len(t.waiting) if t else 0
        return sum(len(t.waiting) for t in self._tenants.values())

    def admitted(self, tenant_id: str) -> int:
        """Requests of ``tenant_id`` admitted (:meth:`admit`) and not yet answered."""
        return self._admitted[tenant_id]

    def refusal(self, tenant_id: str) -> EngineBusy | None:
        """The error :meth:`admit` would refuse a request of ``tenant_id`` with now, else
        ``None``: the tenant already has as many requests admitted as may run at its cap *now*
        (:meth:`cap`: ``per_tenant_shared`` while another tenant is active; more where it still
        holds more slots) plus ``max_queue``, so by the time this one reached the queue it
        would find it full. Refusing here, not in the queue, spares the gateway the request's
        database writes and tokenizing, which on a shared machine take their time from every
        other tenant's requests."""
        held = self._admitted.get(tenant_id, 0)
        if held < self.per_tenant_shared + self.max_queue:  # under any cap: no activity scan
            return None
        t = self._tenants.get(tenant_id)
        runs = max(self.cap(tenant_id), t.running if t else 0)
        if held < runs + self.max_queue:
            return None
        return EngineBusy(
            f"this tenant already has {held} engine requests running or queued (at most "
            f"{runs} run at once now, {self.max_queue} wait); retry later",
            headers={"Retry-After": "1"},
        )

    @contextlib.contextmanager
    def admit(self, tenant_id: str) -> Iterator[None]:
        """Count one request of ``tenant_id`` that will need the engine, from its arrival to its
        answer. Refuses it at once (:class:`EngineBusy`, :meth:`refusal`) when every slot its
        tenant may hold now and its whole queue would be taken by the time it got there.
        Costs no I/O; never waits."""
        refused = self.refusal(tenant_id)
        if refused is not None:
            raise refused
        self._admitted[tenant_id] += 1
        try:
            yield
        finally:
            self._admitted[tenant_id] -= 1
            if not self._admitted[tenant_id]:
                del self._admitted[tenant_id]

    @contextlib.asynccontextmanager
    async def slot(self, tenant_id: str) -> AsyncIterator[int]:
        """Hold one engine slot of ``tenant_id`` for the block (wait for a fair turn). The
        block runs with :data:`~kvaas.engine.priorities.ENGINE_PRIORITY` set to the priority
        the slot was granted with (also what the block gets): ``INTERACTIVE`` when the request
        is its tenant's only one, ``SHARED`` when it is one of several while another tenant is
        active, ``ALONE`` otherwise (see :mod:`kvaas.engine.scheduler`)."""
        priority = await self._acquire(tenant_id)
        before = ENGINE_PRIORITY.get()
        ENGINE_PRIORITY.set(priority)
        try:
            yield priority
        finally:
            # set, not reset: a stream's slot may end in another task's context
            ENGINE_PRIORITY.set(before)
            self._release(tenant_id)

    async def stream(self, tenant_id: str, items: AsyncIterator[T]) -> Admitted[T]:
        """Admit the stream ``items`` and start it: wait for a slot of ``tenant_id`` (a refusal,
        :class:`EngineBusy`, is raised here) and for its first item (so is an error before
        it). The iterator returned yields every item; the slot is held until the stream ends,
        fails or is closed (``aclose``: a client that went away), and ``items`` is closed
        with it."""
        held = self._held(tenant_id, items)
        try:
            first = await anext(held)
        except StopAsyncIteration:
            return Admitted(held, ())
        return Admitted(held, (first,))

    async def _held(self, tenant_id: str, items: AsyncIterator[T]) -> AsyncGenerator[T, None]:
        async with self.slot(tenant_id):
            try:
                async for item in items:
                    yield item
            finally:
                await aclose(items)

    def cap(self, tenant_id: str) -> int:
        """Slots ``tenant_id`` may hold now: ``per_tenant`` alone, ``per_tenant_shared`` while
        another tenant is active."""
        return self._cap(tenant_id, self._active())

    def _cap(self, tenant_id: str, active: set[str]) -> int:
        others = len(active) - (tenant_id in active)
        return self.per_tenant_shared if others else self.per_tenant

    def _active(self) -> set[str]:
        """Tenants running or waiting, or seen within ``active_s``."""
        now = time.monotonic()
        recent = {tid for tid, at in self._last_active.items() if now - at < self.active_s}
        return recent.union(self._tenants)

    def _priority(self, tenant_id: str, t: _Tenant, active: set[str]) -> int:
        """The engine priority of a request of ``tenant_id`` granted now (before its slot is
        counted): its tenant's lone request is interactive."""
        if t.running == 0 and not t.waiting and self._admitted[tenant_id] <= 1:
            return INTERACTIVE
        return SHARED if len(active) - (tenant_id in active) else ALONE

    def _touch(self, tenant_id: str) -> None:
        now = time.monotonic()
        self._last_active[tenant_id] = now
        if len(self._last_active) > 4 * (len(self._tenants) + 16):  # forget the long idle
            self._last_active = {
                tid: at for tid, at in self._last_active.items() if now - at < self.active_s
            }

    async def _acquire(self, tenant_id: str) -> int:
        """Wait for a slot of ``tenant_id``; the priority it was granted with."""
        t = self._tenants.setdefault(tenant_id, _Tenant())
        if not t.waiting and not self._turns and self._running < self.capacity:
            active = self._active()
            if t.running < self._cap(tenant_id, active):
                return self._start(tenant_id, t, active)
        if len(t.waiting) >= self.max_queue:
            raise EngineBusy(
                f"this tenant already has {t.running} engine requests running and "
                f"{len(t.waiting)} queued; retry later",
                headers={"Retry-After": "1"},
            )
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        t.waiting.append(fut)
        self._turns.setdefault(tenant_id, t)
        self._dispatch()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.max_wait_s)
        except (TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():
                self._release(tenant_id)  # granted as we gave up: hand the slot on
            else:
                fut.cancel()
                self._forget(tenant_id, t, fut)
            if isinstance(e, TimeoutError):
                raise EngineBusy(
                    f"no engine slot freed for this tenant within {self.max_wait_s:g}s; retry",
                    headers={"Retry-After": str(max(1, math.ceil(self.max_wait_s / 10)))},
                ) from None
            raise

    def _start(self, tenant_id: str, t: _Tenant, active: set[str]) -> int:
        """Count a slot granted to ``tenant_id``; its priority."""
        priority = self._priority(tenant_id, t, active)
        self._touch(tenant_id)
        self._running += 1
        self._grants += 1
        t.running += 1
        t.last_served = self._grants
        return priority

    def _release(self, tenant_id: str) -> None:
        t = self._tenants[tenant_id]
        self._touch(tenant_id)
        self._running -= 1
        t.running -= 1
        if t.running == 0 and not t.waiting:
            del self._tenants[tenant_id]
        self._dispatch()

    def _forget(self, tenant_id: str, t: _Tenant, fut: asyncio.Future[int]) -> None:
        with contextlib.suppress(ValueError):
            t.waiting.remove(fut)
        if not t.waiting:
            self._turns.pop(tenant_id, None)
            if t.running == 0:
                self._tenants.pop(tenant_id, None)
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant free slots: each to the waiting tenant (under its cap) served least recently,
        so every backlogged tenant gets a turn before any gets a second. When a waiter is held
        back only by the shared cap, look again once the others' activity has lapsed. The set of
        active tenants is computed once per dispatch (a grant only makes a tenant that is
        already waiting active), so a dispatch is linear in the tenants waiting."""
        if not self._turns:
            return
        active = self._active()
        while self._running < self.capacity and self._turns:
            eligible = [
                (t.last_served, i, tid)
                for i, (tid, t) in enumerate(self._turns.items())
                if t.running < self._cap(tid, active)
            ]
            if not eligible:
                if any(t.running < self.per_tenant for t in self._turns.values()):
                    self._wake_later()
                return
            tenant_id = min(eligible)[2]
            t = self._turns.pop(tenant_id)
            fut = t.waiting.popleft()
            fut.set_result(self._start(tenant_id, t, active))
            if t.waiting:
                self._turns[tenant_id] = t

    def _wake_later(self) -> None:
        """Dispatch again when the next recent activity lapses (a tenant seen within
        ``active_s`` that holds and waits for nothing any more)."""
        if self._wakeup is not None:
            return
        now = time.monotonic()
        lapses = [
            at + self.active_s - now
            for tid, at in self._last_active.items()
            if tid not in self._tenants and now - at < self.active_s
        ]
        if not lapses:
            return

        def wake() -> None:
            self._wakeup = None
            self._dispatch()

        self._wakeup = asyncio.get_running_loop().call_later(max(min(lapses), 0.001), wake)


class Admitted(Generic[T]):
    """An admitted stream (:meth:`FairGate.stream`): its first item, already produced, then the
    rest. ``aclose`` frees the slot and closes the source whether or not it was read."""

    def __init__(self, held: AsyncGenerator[T, None], first: tuple[T, ...]) -> None:
        self._held = held
        self._first = list(first)

    def __aiter__(self) -> Admitted[T]:
        return self

    async def __anext__(self) -> T:
        if self._first:
            return self._first.pop()
        return await anext(self._held)

    async def aclose(self) -> None:
        await self._held.aclose()
