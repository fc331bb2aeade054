"""Results of costly dashboard aggregates, kept per process and refreshed in the background.

Month-to-date revenue prices every tenant's month like an invoice, storage over time replays
every cache's lifecycle, and the attach statistics read two weeks of usage events: at 100,000
caches these take from a fraction of a second to seconds. A page shows the last result with
the time it was computed; once it is older than ``ttl`` seconds the next request starts a new
computation in the background and still gets the last result at once. Only the very first
request has to wait (pages load those parts separately, so the rest of the page does not).
One computation per key runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("kvaas.dashboard")

Compute = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Kept:
    value: Any
    computed_at: datetime
    fresh_until: float  # monotonic seconds


class Memo:
    """Last results per key (see the module text)."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._kept: dict[str, Kept] = {}
        self._running: dict[str, asyncio.Task[Kept]] = {}

    def _start(self, key: str, compute: Compute) -> asyncio.Task[Kept]:
        task = self._running.get(key)
        if task is None:

            async def run() -> Kept:
                try:
                    value = await compute()
                    kept = Kept(value, datetime.now(UTC), self._clock() + self.ttl)
                    self._kept[key] = kept
                    return kept
                finally:
                    self._running.pop(key, None)

            task = self._running[key] = asyncio.create_task(run())
            task.add_done_callback(_log_failure)
        return task

    def peek(self, key: str, compute: Compute) -> Kept | None:
        """The last result (``None`` before the first, which :meth:`get` computes); a stale
        one starts a new computation in the background."""
        kept = self._kept.get(key)
        if kept is not None and kept.fresh_until <= self._clock():
            self._start(key, compute)
        return kept

    async def get(self, key: str, compute: Compute) -> Kept:
        """The last result, or the first one once computed (waiting for it)."""
        kept = self.peek(key, compute)
        if kept is not None:
            return kept
        return await asyncio.shield(self._start(key, compute))

    def forget(self, key: str) -> None:
        """Drop the kept result (the next :meth:`get` computes anew)."""
        self._kept.pop(key, None)

    async def close(self) -> None:
        """Cancel the computations still running (at shutdown: each closes its session)."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _log_failure(task: asyncio.Task[Kept]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("dashboard aggregate failed: %s", task.exception())
