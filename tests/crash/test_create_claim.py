"""A create names its cache under the request's Idempotency-Key in the transaction that
inserts the cache: both land together, or neither (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from kvaas.db.base import utcnow
from kvaas.db.claims import CLAIMED_KEY
from kvaas.db.models import Cache, IdempotencyRecord

from .conftest import World


async def test_the_cache_is_named_under_the_key_in_its_own_transaction(world: World) -> None:
    w = world
    now = utcnow()
    async with w.db.session() as s:
        s.add(
            IdempotencyRecord(
                tenant_id=w.tenant.id,
                key="k1",
                request_hash="0" * 64,
                method="POST",
                path="/v1/cache/create",
                state="in_flight",
                created_at=now,
                expires_at=now + timedelta(hours=1),
            )
        )
        await s.commit()
    template = await w.seed({1: "ready"})
    async with w.db.session() as s:
        cache = await s.get(Cache, template.id)
        assert cache is not None
        s.expunge(cache)
    fresh = Cache(
        **{
            c.key: getattr(cache, c.key)
            for c in Cache.__mapper__.column_attrs
            if c.key not in ("id", "updated_at", "deleted_at")
        }
    )
    fresh.status = "pending"
    token = CLAIMED_KEY.set((w.tenant.id, "k1"))
    try:
        async with w.db.session() as s:
            await w.service._begin_create(s, w.tenant, fresh)
    finally:
        CLAIMED_KEY.reset(token)
    async with w.db.session() as s:
        rec = await s.get(IdempotencyRecord, (w.tenant.id, "k1"))
    assert rec is not None and rec.resource_id == fresh.id and rec.state == "in_flight"
