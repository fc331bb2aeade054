"""Streams of engine output that are paid for however they end.

A streamed request's client may go away at any point: the server then closes the stream (or
cancels the task iterating it) and nothing after the current ``yield`` runs, except ``finally``
blocks, where every ``await`` may be cancelled again. :func:`metered` records what the engine
produced in such a ``finally``, in a task of its own (:func:`settle`) that the cancellation
cannot reach, so a client that disconnects mid-stream still pays for the tokens produced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

log = logging.getLogger("kvaas.metering")

T = TypeVar("T")


async def aclose(items: AsyncIterator[Any]) -> None:
    """Close ``items`` if it can be closed (an async generator: its ``finally`` runs now)."""
    close = getattr(items, "aclose", None)
    if close is not None:
        await close()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("recording usage failed", exc_info=task.exception())


async def settle(pending: set[asyncio.Task[None]], record: Callable[[], Awaitable[None]]) -> None:
    """Run ``record()`` to its end in a task of its own, kept in ``pending`` until it is done
    (wait for them at shutdown). Awaiting this may be cancelled; ``record`` is not: it must
    open (and commit) its own database session."""

    async def run() -> None:
        await record()

    task = asyncio.create_task(run(), name="record usage")
    pending.add(task)
    task.add_done_callback(pending.discard)
    task.add_done_callback(_log_failure)
    await asyncio.shield(task)


async def metered(
    items: AsyncIterator[T],
    absorb: Callable[[T], None],
    record: Callable[[], Awaitable[None]],
    pending: set[asyncio.Task[None]],
) -> AsyncGenerator[T, None]:
    """``items``, each passed to ``absorb`` (a running total) before it is yielded. Once the
    stream has produced anything, ``record`` runs (by :func:`settle`) exactly once when it
    ends, fails or is closed, whatever the total is by then."""
    started = False
    try:
        async for item in items:
            started = True
            absorb(item)
            yield item
    finally:
        try:
            await aclose(items)
        finally:
            if started:
                await settle(pending, record)
