"""Billing follows storage exactly: after every lifecycle operation on a cache (version
deletes, the latest one's included; class changes; the final delete), the storage the ledger
meters from then on is the cache's size and class in the database (SQLite and PostgreSQL;
random sequences, fixed seeds)."""

from __future__ import annotations

import random
from datetime import timedelta

from kvaas.db.base import utcnow
from kvaas.metering import hooks as metering
from kvaas.metering.storage import load_segments
from kvaas.services.caches import CachePatch

from .conftest import World


async def _metered(w: World, cache_id: str) -> tuple[int, str] | None:
    """(tokens, class) the ledger meters the cache at from now on; None once it ended."""
    now = utcnow()
    async with w.db.session() as s:
        segments, _ = await load_segments(
            s, w.tenant.id, now - timedelta(hours=1), now + timedelta(hours=2)
        )
    mine = [g for g in segments if g.cache_id == cache_id]
    if not mine or (mine[-1].end is not None and mine[-1].end <= int(now.timestamp())):
        return None
    last = max(mine, key=lambda g: g.start)
    return last.state.tokens, last.state.storage_class


async def test_metered_storage_matches_the_cache_after_every_operation(world: World) -> None:
    w = world
    for seed in range(6):
        rng = random.Random(seed)
        n = rng.randint(2, 4)
        cache = await w.seed({v: "ready" for v in range(1, n + 1)})
        async with w.db.session() as s:
            row = await s.get(type(cache), cache.id)
            assert row is not None
            await metering.on_cache_ready(s, row)  # as the create recorded it
            await s.commit()
        live = list(range(1, n + 1))
        while len(live) > 1:
            op = rng.choice(["version", "version", "class"])
            async with w.db.session() as s:
                if op == "version":
                    v = rng.choice(live)
                    await w.service.delete_version(s, w.tenant, cache.id, v)
                    live.remove(v)
                else:
                    cls = rng.choice(["hot", "standard", "cold"])
                    await w.service.update(s, w.tenant, cache.id, CachePatch(storage_class=cls))
            row = await w.row(cache.id)
            assert row.tokens == max(live) * 32
            assert await _metered(w, cache.id) == (row.tokens, row.storage_class), (seed, op)
        async with w.db.session() as s:
            await w.service.delete(s, w.tenant, cache.id)
        assert await _metered(w, cache.id) is None
