"""Listing a tenant's caches and tags: filters and keyset pagination.

Pages are cut with an opaque cursor (the last row's sort key), never with OFFSET, and the
total is never counted: a page costs one index range scan whatever the tenant holds. Caches are
read through the partial index ``(tenant_id, created_at, id) WHERE status IN ('pending',
'ready', 'failed')`` (``(tenant_id, name, created_at, id)`` when filtering by name); the status
list is rendered as literals so PostgreSQL can match the index predicate.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Select, literal_column, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.base import utcnow
from kvaas.db.models import LISTED_STATUSES, Cache, CacheTag
from kvaas.errors import ValidationFailed

MAX_LIMIT = 100


def encode_cursor(*parts: Any) -> str:
    raw = json.dumps(list(parts), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str, arity: int, param: str = "after") -> list[Any]:
    """The parts of a cursor made by :func:`encode_cursor`; 422 for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        parts = None
    if not isinstance(parts, list) or len(parts) != arity:
        raise ValidationFailed("the cursor is not valid: pass `next_cursor` unchanged", param=param)
    return parts


@dataclass
class CacheFilter:
    limit: int = 20
    after: str | None = None
    order: Literal["asc", "desc"] = "desc"
    name: str | None = None
    tag: str | None = None
    status: str | None = None
    model: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Page:
    rows: Sequence[Any]
    next_cursor: str | None

    @property
    def has_more(self) -> bool:
        return self.next_cursor is not None


def _status_in(statuses: Sequence[str]) -> Any:
    assert set(statuses) <= set(LISTED_STATUSES)
    return Cache.status.in_([literal_column(f"'{s}'") for s in statuses])


def _after(q: Select[Any], cols: tuple[Any, ...], key: tuple[Any, ...], desc: bool) -> Any:
    row = tuple_(*cols)  # compared with a plain tuple, each value is bound with its column's type
    return q.where(row < key if desc else row > key)


async def list_caches(session: AsyncSession, tenant_id: str, f: CacheFilter) -> Page:
    """One page of the tenant's listed caches (``pending``, ``ready``, ``failed``; never past
    ``expires_at``), newest first unless ``order="asc"``."""
    statuses = (f.status,) if f.status else LISTED_STATUSES
    q = select(Cache).where(
        Cache.tenant_id == tenant_id, _status_in(statuses), Cache.expires_at > utcnow()
    )
    if f.name is not None:
        q = q.where(Cache.name == f.name)
    if f.model is not None:
        q = q.where(Cache.model == f.model)
    if f.tag is not None:
        q = q.where(
            Cache.id
            == select(CacheTag.cache_id)
            .where(CacheTag.tenant_id == tenant_id, CacheTag.name == f.tag)
            .scalar_subquery()
        )
    for k, v in sorted(f.metadata.items()):
        q = q.where(Cache.meta[k].as_string() == v)
    desc = f.order == "desc"
    if f.after:
        at, cid = decode_cursor(f.after, 2)
        try:
            key = (datetime.fromisoformat(at), str(cid))
        except (TypeError, ValueError):
            raise ValidationFailed("the cursor is not valid", param="after") from None
        q = _after(q, (Cache.created_at, Cache.id), key, desc)
    order = (Cache.created_at.desc(), Cache.id.desc()) if desc else (Cache.created_at, Cache.id)
    rows = (await session.execute(q.order_by(*order).limit(f.limit + 1))).scalars().all()
    more = len(rows) > f.limit
    rows = rows[: f.limit]
    cursor = encode_cursor(rows[-1].created_at.isoformat(), rows[-1].id) if more else None
    return Page(rows, cursor)


def _live_cache() -> Any:
    return (
        select(Cache.id)
        .where(Cache.id == CacheTag.cache_id, _status_in(LISTED_STATUSES))
        .where(Cache.expires_at > utcnow())
        .exists()
    )


async def list_tags(
    session: AsyncSession, tenant_id: str, *, limit: int, after: str | None
) -> Page:
    """One page of the tenant's tags (pointing at live caches), by name."""
    q = select(CacheTag).where(CacheTag.tenant_id == tenant_id, _live_cache())
    if after:
        (name,) = decode_cursor(after, 1)
        q = q.where(CacheTag.name > str(name))
    rows = (await session.execute(q.order_by(CacheTag.name).limit(limit + 1))).scalars().all()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1].name) if more else None)


async def get_tag(session: AsyncSession, tenant_id: str, name: str) -> CacheTag | None:
    """The tag if it points at a live cache."""
    return (
        await session.execute(
            select(CacheTag).where(
                CacheTag.tenant_id == tenant_id, CacheTag.name == name, _live_cache()
            )
        )
    ).scalar_one_or_none()


async def tags_of(session: AsyncSession, cache_ids: Sequence[str]) -> dict[str, list[str]]:
    """Tag names per cache id (sorted)."""
    out: dict[str, list[str]] = {cid: [] for cid in cache_ids}
    if not cache_ids:
        return out
    rows = await session.execute(
        select(CacheTag.cache_id, CacheTag.name)
        .where(CacheTag.cache_id.in_(list(cache_ids)))
        .order_by(CacheTag.name)
    )
    for cid, name in rows:
        out[cid].append(name)
    return out
