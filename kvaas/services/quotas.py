"""Per-tenant storage quotas: what a tenant holds, and the checks on create and extend.

A tenant's usage is the sum over its *live* caches (``pending`` or ``ready`` and not past
``expires_at``) of their tokens and stored bytes, plus what prefills in progress have
reserved (``reserved_tokens`` / ``reserved_bytes``), and their count. Limits, each the
tenant's own value or, when that is ``None``, the default setting (:func:`limits_of`): every
tenant is bounded, so one tenant cannot fill the tiers that all of them share.

- ``storage_quota_tokens`` / ``storage_quota_bytes`` (defaults ``default_storage_quota_tokens``
  / ``default_storage_quota_bytes``; an operator lifts a default with ``unlimited``): a create
  or extend that would go over answers ``402 quota_exceeded``;
- ``max_caches`` (default ``default_max_caches``): one more live cache than that answers
  ``429 cache_limit_exceeded`` (no ``Retry-After``: waiting does not help, deleting does).

The error's ``error`` object names the ``limit`` (``storage_tokens``, ``storage_bytes`` or
``caches``), the ``current`` usage, the ``maximum`` and what the request ``requested``.

A new cache's bytes are not known before its prefill: it reserves the bound of
:func:`kvaas.codec.sizing.chunk_size` per chunk (exact for the fixed-size schemes, the ``none``
size for ``lossless``) until the prefill ends; then the bytes actually stored replace it.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.config import Settings
from kvaas.db.base import utcnow
from kvaas.db.models import Cache, Tenant
from kvaas.db.session import lock_for_write
from kvaas.errors import APIError

#: Statuses that hold (or are about to hold) storage.
LIVE_STATUSES = ("pending", "ready")


class QuotaExceeded(APIError):
    status_code = 402
    type = "quota_exceeded"
    description = "The request would take the tenant over its storage quota."


class CacheLimitExceeded(APIError):
    status_code = 429
    type = "cache_limit_exceeded"
    description = "The tenant holds as many live caches as it may; delete one first."


@dataclass(frozen=True, slots=True)
class Limits:
    """A tenant's limits (``None`` quota: unlimited): the service's defaults
    (:meth:`from_settings`), or those in force for one tenant (:func:`limits_of`)."""

    max_caches: int
    storage_tokens: int | None
    storage_bytes: int | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.default_max_caches,
            settings.default_storage_quota_tokens,
            settings.default_storage_quota_bytes,
        )


@dataclass(frozen=True, slots=True)
class Usage:
    caches: int
    tokens: int
    bytes: int


async def usage(session: AsyncSession, tenant_id: str) -> Usage:
    """The tenant's live caches, tokens and bytes (reservations included), in one query."""
    row = (
        await session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(Cache.tokens + Cache.reserved_tokens), 0),
                func.coalesce(func.sum(Cache.stored_bytes + Cache.reserved_bytes), 0),
            ).where(
                Cache.tenant_id == tenant_id,
                Cache.status.in_(LIVE_STATUSES),
                Cache.expires_at > utcnow(),
            )
        )
    ).one()
    return Usage(int(row[0]), int(row[1]), int(row[2]))


def check(
    tenant: Tenant,
    current: Usage,
    *,
    new_cache: bool,
    tokens: int,
    nbytes: int,
    defaults: Limits,
) -> None:
    """Raise if adding ``tokens`` / ``nbytes`` (and one cache when ``new_cache``) goes over the
    tenant's limits (its own, else ``defaults``)."""
    limits = limits_of(tenant, defaults)
    if new_cache:
        maximum = limits.max_caches
        if current.caches + 1 > maximum:
            raise CacheLimitExceeded(
                f"this tenant holds {current.caches} live caches, its maximum is {maximum}; "
                "delete caches (or let them expire) first",
                extra={"limit": "caches", "current": current.caches, "maximum": maximum},
            )
    for limit, used, add, quota in (
        ("storage_tokens", current.tokens, tokens, limits.storage_tokens),
        ("storage_bytes", current.bytes, nbytes, limits.storage_bytes),
    ):
        if quota is not None and used + add > quota:
            raise QuotaExceeded(
                f"{limit}: {used} used + {add} requested exceeds the quota of {quota}",
                extra={"limit": limit, "current": used, "maximum": quota, "requested": add},
            )


def limits_of(tenant: Tenant, defaults: Limits) -> Limits:
    """The limits in force for ``tenant``: each of its own, else the default."""
    return Limits(
        tenant.max_caches if tenant.max_caches is not None else defaults.max_caches,
        _own(tenant.storage_quota_tokens, defaults.storage_tokens),
        _own(tenant.storage_quota_bytes, defaults.storage_bytes),
    )


def _own(value: int | None, default: int | None) -> int | None:
    return value if value is not None else default


class Guard:
    """Serialises the quota checks of one tenant until the caller commits inside the block.

    Across every gateway process: the tenant's row is held for writing until the transaction
    ends (:func:`~kvaas.db.session.lock_for_write`: PostgreSQL's row lock, SQLite's write
    lock). In-process as well: one of a few asyncio locks, picked by the tenant id.
    """

    def __init__(self, stripes: int = 64) -> None:
        self._locks = tuple(asyncio.Lock() for _ in range(stripes))

    @contextlib.asynccontextmanager
    async def __call__(self, session: AsyncSession, tenant: Tenant) -> AsyncIterator[Usage]:
        async with self._locks[zlib.crc32(tenant.id.encode()) % len(self._locks)]:
            await lock_for_write(session, Tenant, Tenant.id, tenant.id)
            yield await usage(session, tenant.id)
