"""The usage ledger on SQLite and PostgreSQL: same-transaction recording, idempotency, exact
meters across period boundaries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from kvaas.db.models import CacheLifecycleEvent, UsageEvent
from kvaas.db.session import Database
from kvaas.metering import hooks
from kvaas.metering.ledger import record_usages
from kvaas.metering.storage import meter_usage

T0 = datetime(2026, 9, 30, 23, 0, 0, tzinfo=UTC)
SEP = (datetime(2026, 9, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC))
OCT = (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))


async def _count(db: Database, model: type) -> int:
    async with db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(model)) or 0)


async def test_events_land_in_the_callers_transaction(db: Database, make_tenant, cache_obj) -> None:
    t = await make_tenant("acme")
    cache = cache_obj(t.id, "cache_a", 1000)
    async with db.session() as s:
        await hooks.on_create(s, cache, 1000, "req_1", T0)
        await hooks.on_cache_ready(s, cache, T0)
        await s.rollback()  # the action failed: nothing is metered
    assert await _count(db, UsageEvent) == 0
    assert await _count(db, CacheLifecycleEvent) == 0
    async with db.session() as s:
        await hooks.on_create(s, cache, 1000, "req_1", T0)
        await hooks.on_cache_ready(s, cache, T0)
        await s.commit()
    assert await _count(db, UsageEvent) == 2  # prefill_tokens + cache_creations
    assert await _count(db, CacheLifecycleEvent) == 1


async def test_replayed_events_are_counted_once(db: Database, make_tenant, cache_obj) -> None:
    t = await make_tenant("acme")
    cache = cache_obj(t.id, "cache_a", 1000)
    for _ in range(3):  # a retried request replays every hook
        async with db.session() as s:
            await hooks.on_create(s, cache, 1000, "req_c", T0)
            await hooks.on_cache_ready(s, cache, T0)
            await hooks.on_attach(
                s,
                cache,
                cached_tokens=768,
                prefill_tokens=240,
                output_tokens=16,
                request_id="req_a1",
                at=T0 + timedelta(minutes=5),
            )
            await hooks.on_cache_ended(s, cache, "deleted", T0 + timedelta(minutes=30))
            await s.commit()
    async with db.session() as s:
        assert not await hooks.on_cache_ready(s, cache, T0)  # False: already recorded
        u = await meter_usage(s, t.id, *SEP)
    assert (u.prefill_tokens, u.cached_tokens, u.output_tokens, u.cache_creations) == (
        1240,
        768,
        16,
        1,
    )
    assert u.storage_token_seconds["standard"] == 1000 * 30 * 60


async def test_storage_across_a_period_boundary(db: Database, make_tenant, cache_obj) -> None:
    t = await make_tenant("acme")
    other = await make_tenant("globex")
    cache = cache_obj(t.id, "cache_b", 1000, stored_bytes=4096)
    async with db.session() as s:
        await hooks.on_cache_ready(s, cache, T0)  # Sep 30 23:00, 1000 tokens, standard
        cache.tokens, cache.version, cache.stored_bytes = 1500, 2, 6144
        await hooks.on_cache_extended(s, cache, T0 + timedelta(hours=2))  # Oct 1 01:00
        await hooks.on_storage_class_changed(
            s, cache, "standard", "cold", T0 + timedelta(hours=3)
        )  # Oct 1 02:00, now on disk
        cache.storage_class = "cold"
        await hooks.on_cache_ended(s, cache, "deleted", T0 + timedelta(hours=4, seconds=1.7))
        await hooks.on_cache_ready(s, cache_obj(other.id, "cache_o", 99), T0)  # other tenant
        await s.commit()
    async with db.session() as s:
        sep = await meter_usage(s, t.id, *SEP)
        oct_ = await meter_usage(s, t.id, *OCT)
    assert sep.storage_token_seconds == {"hot": 0, "standard": 1000 * 3600, "cold": 0}
    assert oct_.storage_token_seconds == {
        "hot": 0,
        "standard": 1000 * 3600 + 1500 * 3600,
        "cold": 1500 * 3601,  # ended at 03:00:01.7, counted to the whole second
    }
    assert sep.stored_byte_seconds["redis"] == 4096 * 3600
    assert oct_.stored_byte_seconds == {
        "memory": 0,
        "redis": 4096 * 3600 + 6144 * 3600,
        "disk": 6144 * 3601,
    }
    assert sorted(c for c, _ in oct_.per_cache) == ["cache_b", "cache_b"]


async def test_expiry_stops_at_expires_at(db: Database, make_tenant, cache_obj) -> None:
    t = await make_tenant("acme")
    cache = cache_obj(t.id, "cache_e", 500, "hot")
    cache.expires_at = T0 + timedelta(hours=1)
    async with db.session() as s:
        await hooks.on_cache_ready(s, cache, T0)
        await hooks.on_cache_ended(s, cache, "expired")  # the sweep ran late: at=None
        await s.commit()
    async with db.session() as s:
        u = await meter_usage(s, t.id, SEP[0], OCT[1])
    assert u.storage_token_seconds["hot"] == 500 * 3600


async def test_several_events_in_one_statement_skip_the_keys_already_recorded(
    db: Database, make_tenant, cache_obj
) -> None:
    t = await make_tenant("acme")
    cache = cache_obj(t.id, "cache_a", 1000)
    batch = [("b:1", "cached_tokens", 10), ("b:2", "prefill_tokens", 20)]
    async with db.session() as s:
        assert await record_usages(s, batch[:1], tenant_id=t.id, occurred_at=T0) == 1
        await s.commit()
    async with db.session() as s:  # one recorded already, two new
        more = [*batch, ("b:3", "output_tokens", 30)]
        n = await record_usages(s, more, tenant_id=t.id, occurred_at=T0, cache_id=cache.id)
        await s.commit()
    assert n == 2
    async with db.session() as s:
        rows = (await s.execute(select(UsageEvent.id, UsageEvent.quantity))).all()
    assert sorted(q for _, q in rows) == [10, 20, 30]
    assert len({i for i, _ in rows}) == 3  # each row got its own id
