"""The store's background work: garbage collection, idle demotion, housekeeping.

:class:`StoreMaintenance` runs independent periodic loops, each on its own schedule, so one
failing (or slow) job never skips another (the cache sweep of the service is a loop of its own,
outside the store):

- **GC** (:meth:`StoreMaintenance.gc_round`): passes of
  :meth:`~kvaas.store.tiered.TieredStore.collect_garbage` of ``gc_batch`` chunks each, repeated
  while a pass claims a whole batch (at most ``gc_max_passes`` per round), every ``gc_every_s``
  seconds. Each pass shares its batch round-robin across tenants (see
  :mod:`kvaas.store.refs_redis`), so a tenant with a large backlog does not starve the others;
  the throughput bound is ``gc_batch * gc_max_passes`` chunks per ``gc_every_s``.
- **Idle demotion** (:meth:`StoreMaintenance.demote_round`): chunks of the ``standard`` class
  not read for ``demote_idle_s`` move from Redis to disk every ``demote_every_s`` seconds.
- **Housekeeping** (:meth:`StoreMaintenance.housekeeping_round`): checks Redis' eviction policy
  again (a Redis that was down at start-up, or restarted with another configuration), gives the
  SQLite index its reserve file back after a full disk, and recounts the shared disk directory
  so that every process sharing it counts the others' chunks against the budget.
- Extra ``jobs`` (name, period, coroutine function) run the same way: the gateway adds the
  per-tier storage billing of :mod:`kvaas.metering.tiers` there.

Every loop logs and counts a failed round and tries again at its next period; cancellation
(shutdown) stops them all, and a GC pass cancelled mid-way gives its claim back
(:meth:`~kvaas.store.tiered.TieredStore.collect_garbage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvaas.store import metrics as m
from kvaas.store.errors import ConfigurationError
from kvaas.store.refs_redis import RedisRefIndex
from kvaas.store.refs_sqlite import SqliteRefIndex
from kvaas.store.tiered import TieredStore

if TYPE_CHECKING:
    from kvaas.config import Settings

log = logging.getLogger("kvaas.store")

Job = tuple[str, float, Callable[[], Awaitable[Any]]]


@dataclass(frozen=True)
class MaintenanceConfig:
    """Schedules of the store's maintenance (seconds, chunk counts)."""

    gc_every_s: float = 10.0
    gc_grace_s: float = 60.0
    gc_batch: int = 1000
    gc_max_passes: int = 20
    gc_lease_s: float = 60.0
    demote_every_s: float = 300.0
    demote_idle_s: float | None = 3600.0
    housekeeping_every_s: float = 60.0
    jobs: Sequence[Job] = field(default_factory=tuple)

    @classmethod
    def from_settings(cls, settings: Settings, jobs: Sequence[Job] = ()) -> MaintenanceConfig:
        """The schedules of a service's settings (``KVAAS_STORE_GC_*``,
        ``KVAAS_STORE_DEMOTE_*``), with extra ``jobs``."""
        return cls(
            gc_every_s=settings.store_gc_interval_seconds,
            gc_batch=settings.store_gc_batch,
            demote_every_s=settings.store_demote_interval_seconds,
            demote_idle_s=settings.store_demote_idle_seconds or None,
            jobs=tuple(jobs),
        )

    def __post_init__(self) -> None:
        for name in ("gc_every_s", "demote_every_s", "housekeeping_every_s", "gc_lease_s"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"store maintenance: {name} must be positive")
        if self.gc_batch <= 0 or self.gc_max_passes <= 0:
            raise ConfigurationError("store maintenance: gc_batch and gc_max_passes must be >= 1")
        if self.demote_idle_s is not None and self.demote_idle_s < 0:
            raise ConfigurationError("store maintenance: demote_idle_s must be >= 0 or None")


class StoreMaintenance:
    """Periodic maintenance of one store (see the module docstring). :meth:`start` runs it as
    a task; cancel the task (or call :meth:`stop`) at shutdown."""

    def __init__(self, store: TieredStore, config: MaintenanceConfig | None = None) -> None:
        self.store = store
        self.config = config or MaintenanceConfig()
        self._task: asyncio.Task[None] | None = None

    # -- one round of each job ---------------------------------------------------------------
    async def gc_round(self) -> int:
        """GC passes until one claims less than a whole batch (bounded); chunks collected."""
        c = self.config
        total = 0
        for _ in range(c.gc_max_passes):
            result = await self.store.collect_garbage(
                grace_s=c.gc_grace_s, limit=c.gc_batch, lease_s=c.gc_lease_s
            )
            if result.skipped_tiers or result.lease_expired:
                break  # a tier is down or slow: the next round retries
            total += result.claimed
            if result.claimed < c.gc_batch:
                break
        return total

    async def demote_round(self) -> int:
        """Move idle ``standard`` chunks to disk; the number moved."""
        if self.config.demote_idle_s is None:
            return 0
        return await self.store.demote_idle(self.config.demote_idle_s)

    async def housekeeping_round(self) -> None:
        """Deferred start-up checks and the index's reserve file."""
        refs = self.store.refs
        if isinstance(refs, RedisRefIndex):  # every round: a Redis restarted with another
            try:  # configuration is caught within one round
                await refs.check_eviction_policy()
            except ConfigurationError as e:  # found unsafe after start-up: say so loudly
                log.error("%s", e.message)
                raise
        if isinstance(refs, SqliteRefIndex):
            await refs.restore_reserve()
        await self.store.rescan_shared()  # the disk budget counts other processes' chunks

    # -- loops -------------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        c = self.config
        out: list[Job] = [
            ("gc", c.gc_every_s, self.gc_round),
            ("housekeeping", c.housekeeping_every_s, self.housekeeping_round),
        ]
        if c.demote_idle_s is not None:
            out.append(("demote", c.demote_every_s, self.demote_round))
        out.extend(c.jobs)
        return out

    @staticmethod
    async def _loop(name: str, every_s: float, job: Callable[[], Awaitable[Any]]) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                done = await job()
            except Exception as e:  # the next round retries
                m.MAINTENANCE_ROUNDS.labels(name, "failed").inc()
                log.warning("store maintenance %s failed: %s", name, e)
                continue
            m.MAINTENANCE_ROUNDS.labels(name, "ok").inc()
            if done:
                log.info("store maintenance %s: %s", name, done)

    async def run_forever(self) -> None:
        """Run every job's loop until cancelled."""
        await asyncio.gather(*(self._loop(n, every, job) for n, every, job in self.jobs()))

    def start(self) -> asyncio.Task[None]:
        """Start :meth:`run_forever` as a task (once) and return it."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run_forever(), name="kvaas-store-maintenance")
        return self._task

    async def stop(self) -> None:
        """Cancel the task and wait for it (a GC pass in flight gives its claim back)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
