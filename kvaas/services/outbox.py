"""The store-release outbox: manifest releases owed to the store, recorded in the database
transaction that retires a cache or version, and drained until the store confirms them.

Contract:

- :func:`queue_release` adds the intent to the caller's session; it lands (or rolls back) with
  the status change the caller commits. A crash after that commit loses nothing: the row
  stays until a drain succeeds.
- :func:`drain` takes due rows oldest first and releases them in the store
  (``delete_manifest`` for each version, every stored version when the row names none, then
  ``requeue_unreferenced`` for the chunks a prefill may have written after a concurrent
  release). Each step is idempotent (an absent manifest is released already), so a row drained
  twice, by two gateways or after a crash between the release and the row's removal, is
  harmless. A row is removed only after the store confirmed; a store error leaves it with
  ``attempts + 1`` and a back-off (:func:`backoff`).
- Version numbers are never reused, and a retired cache never comes back, so a late release
  can never take a live manifest's references.

``kvaas_store_release_outbox_depth`` (gauge) is the number of rows at the last drain;
``kvaas_store_releases_total{result}`` counts drained rows (``released``, ``retried``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import Counter, Gauge
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.base import utcnow
from kvaas.db.models import StoreRelease
from kvaas.db.session import Database
from kvaas.store.errors import StoreError
from kvaas.store.keys import ChunkKey
from kvaas.store.tiered import TieredStore

log = logging.getLogger("kvaas.outbox")

OUTBOX_DEPTH = Gauge(
    "kvaas_store_release_outbox_depth",
    "Manifest releases recorded but not yet confirmed by the store (at the last drain).",
)
RELEASES = Counter(
    "kvaas_store_releases_total",
    "Outbox rows drained: released (the store confirmed) or retried (a store error).",
    ["result"],
)
#: Longest wait between two attempts of one row.
MAX_BACKOFF = timedelta(minutes=5)


def backoff(attempts: int) -> timedelta:
    """Wait before attempt ``attempts + 1``: 1 s, 2 s, 4 s, ... up to :data:`MAX_BACKOFF`."""
    return min(timedelta(seconds=2 ** min(attempts - 1, 16)), MAX_BACKOFF)


def queue_release(
    session: AsyncSession,
    slot: str,
    cache_id: str,
    versions: Sequence[int] | None,
    reason: str,
    written: Sequence[ChunkKey] = (),
    *,
    now: datetime | None = None,
) -> list[StoreRelease]:
    """Record (in ``session``; the caller commits) that the manifests of ``versions`` of
    ``cache_id`` (``None``: every stored version) are to be released, and ``written`` chunks
    queued for collection. ``reason``: what retired them (``deleted``, ``expired``,
    ``version_deleted``, ``failed``, ``orphaned``). Returns the rows added."""
    now = now or utcnow()
    keys = [bytes(k).hex() for k in written]
    targets: list[int | None] = [None] if versions is None else list(versions)
    rows: list[StoreRelease] = []
    for v in targets:
        rows.append(
            StoreRelease(
                slot=slot,
                cache_id=cache_id,
                version=v,
                chunk_keys=keys,
                reason=reason[:32],
                attempts=0,
                created_at=now,
                next_attempt_at=now,
            )
        )
        keys = []  # once is enough
    session.add_all(rows)
    return rows


async def release_now(store: TieredStore, row: StoreRelease) -> int:
    """Carry out one row's release in the store (idempotent); return the manifests released.
    Raises :class:`StoreError` when the store cannot confirm."""
    versions = (
        [row.version]
        if row.version is not None
        else await store.list_versions(row.slot, row.cache_id)
    )
    released = 0
    for v in versions:
        if await store.delete_manifest(row.slot, row.cache_id, v) is not None:
            released += 1
    if row.chunk_keys:
        await store.refs.requeue_unreferenced([ChunkKey(bytes.fromhex(k)) for k in row.chunk_keys])
    return released


@dataclass
class DrainResult:
    released: int = 0  # rows the store confirmed (and removed)
    retried: int = 0  # rows left for a later attempt after a store error
    depth: int = 0  # rows left in the outbox after this drain


async def drain(
    db: Database, store: TieredStore, *, limit: int = 200, batches: int = 10
) -> DrainResult:
    """Release due rows, oldest first, ``limit`` per batch and at most ``batches`` batches
    (another batch only after a full one). The rows the store confirmed leave the outbox in one
    short transaction per batch (a crash before that releases them again: harmless). Stops at
    the first store error (the store is likely down: that row gets its back-off, the rest wait
    for the next drain)."""
    result = DrainResult()
    async with db.session() as session:
        for _ in range(batches):
            rows = list(
                (
                    await session.execute(
                        select(StoreRelease)
                        .where(StoreRelease.next_attempt_at <= utcnow())
                        .order_by(StoreRelease.id)
                        .limit(limit)
                    )
                ).scalars()
            )
            await session.commit()
            done: list[int] = []
            failed = False
            for row in rows:
                try:
                    await release_now(store, row)
                except StoreError as e:
                    failed = True
                    await _retry_later(session, row, e)
                    result.retried += 1
                    RELEASES.labels("retried").inc()
                    break
                done.append(row.id)
            if done:
                await session.execute(delete(StoreRelease).where(StoreRelease.id.in_(done)))
                await session.commit()
                result.released += len(done)
                RELEASES.labels("released").inc(len(done))
            if failed or len(rows) < limit:
                break
        result.depth = await depth(session)
        await session.commit()
    OUTBOX_DEPTH.set(result.depth)
    return result


async def _retry_later(session: AsyncSession, row: StoreRelease, error: StoreError) -> None:
    attempts = row.attempts + 1
    await session.execute(
        update(StoreRelease)
        .where(StoreRelease.id == row.id)
        .values(
            attempts=attempts,
            last_error=str(error)[:500],
            next_attempt_at=utcnow() + backoff(attempts),
        )
    )
    await session.commit()
    log.warning(
        "release of %s v%s failed (attempt %d), retried later: %s",
        row.cache_id,
        "*" if row.version is None else row.version,
        attempts,
        error,
    )


async def depth(session: AsyncSession) -> int:
    """Rows in the outbox (due or waiting for their back-off)."""
    return int((await session.execute(select(func.count()).select_from(StoreRelease))).scalar_one())
