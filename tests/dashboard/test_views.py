"""Storage over time: bytes per tier at each hour, from the cache lifecycle; caches that ended
before the window add nothing, caches that ended inside it drop out when they ended."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kvtest.dashboard import Dash, seed_cache

from kvaas.metering.ledger import record_lifecycle
from kvaas.services import admin_views


async def _end(dash: Dash, tenant_id: str, cache_id: str, at: datetime) -> None:
    async with dash.db.session() as s:
        await record_lifecycle(
            s,
            idempotency_key=f"lc:{cache_id}:ended",
            tenant_id=tenant_id,
            cache_id=cache_id,
            kind="ended",
            at=at,
            reason="deleted",
        )
        await s.commit()


async def test_storage_over_time(dash: Dash) -> None:
    await dash.login()
    await dash.post("/admin/tenants", {"name": "acme"})
    async with dash.db.session() as s:
        tid = (await admin_views.tenant_ids(s))[0]
    # twenty past an hour: each point is a whole number of hours and 20 minutes before it
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(minutes=40)
    old = await seed_cache(dash.db, tid, stored_bytes=1000, created_at=now - timedelta(days=9))
    await _end(dash, tid, old, now - timedelta(days=8))  # gone before the window
    mid = await seed_cache(dash.db, tid, stored_bytes=200, created_at=now - timedelta(days=3))
    await _end(dash, tid, mid, now - timedelta(hours=10, minutes=30))  # gone inside it
    await seed_cache(dash.db, tid, stored_bytes=30, created_at=now - timedelta(hours=5, minutes=30))
    await seed_cache(
        dash.db, tid, stored_bytes=4, storage_class="cold", created_at=now - timedelta(days=1)
    )
    async with dash.db.session() as s:
        points = await admin_views.storage_over_time(s, now, hours=48)
    assert len(points) == 49 and points[-1][0] == now
    held = {int((now - at).total_seconds()) // 3600: tiers for at, tiers in points[:-1]}
    assert sorted(held) == list(range(48))
    assert held[47]["redis"] == 200 and held[47]["disk"] == 0
    assert held[12]["redis"] == 200 and held[12]["disk"] == 4
    assert held[11]["redis"] == 200 and held[10]["redis"] == 0  # ended 10 h 30 min before
    assert held[6]["redis"] == 0 and held[5]["redis"] == 30  # started 5 h 30 min before
    assert points[-1][1] == {"memory": 0, "redis": 30, "disk": 4}
