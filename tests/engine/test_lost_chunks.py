"""A cache whose stored chunks are gone from every tier (a Redis restart that lost recent
writes, a replaced disk) is found out by its next attach: a miss that says ``evicted``, the
cache ``failed`` with a reason that says its KV was lost, its storage billed until that moment
and no longer. A cache whose chunks are only out of reach (a tier down) is left alone."""

from __future__ import annotations

import pytest
from kvtest.caches import corpus_ids, new_client
from sqlalchemy import select

from kvaas.db.models import CacheLifecycleEvent
from kvaas.store.errors import StoreError

pytestmark = [pytest.mark.engine, pytest.mark.slow]


async def _lifecycle(gateway, cache_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    async with gateway.app.state.db.session() as s:
        rows = await s.scalars(
            select(CacheLifecycleEvent.kind)
            .where(CacheLifecycleEvent.cache_id == cache_id)
            .order_by(CacheLifecycleEvent.at, CacheLifecycleEvent.id)
        )
        return list(rows.all())


async def test_lost_chunks_fail_the_cache_and_end_its_billing(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)
    cache = await cl.create(ids[:600])
    keys = await cl.keys(ids[:600], cache["compression"])
    store = cl.service.store
    for tier in store.tiers:  # every copy of the chunks is gone, the tiers themselves are up
        await tier.delete_many(keys)

    r = await cl.attach(cache_id=cache["id"], token_ids=ids[600:608], max_tokens=2)
    assert r.status_code == 200, r.text
    assert r.json()["cache"] == {"id": cache["id"], "hit": False, "miss_reason": "evicted"}
    got = (await cl.get(cache["id"])).json()
    assert got["status"] == "failed" and "lost" in got["failure_reason"], got
    assert await _lifecycle(gateway, cache["id"]) == ["started", "ended"]
    # the cache is no longer attachable, and a second look bills nothing more
    r = await cl.attach(cache_id=cache["id"], token_ids=ids[600:608], max_tokens=2)
    assert r.status_code in (404, 409), r.text
    assert await _lifecycle(gateway, cache["id"]) == ["started", "ended"]


async def test_chunks_out_of_reach_leave_the_cache_ready(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)
    cache = await cl.create(ids[1000:1600])
    keys = await cl.keys(ids[1000:1600], cache["compression"])
    store = cl.service.store
    for tier in store.tiers:
        await tier.delete_many(keys)

    async def down(*_a, **_k):  # type: ignore[no-untyped-def]
        raise StoreError("a tier is down")

    monkeypatch.setattr(store, "lost_chunks", down)  # the store cannot tell what is gone
    r = await cl.attach(cache_id=cache["id"], token_ids=ids[1600:1608], max_tokens=2)
    assert r.status_code == 200 and r.json()["cache"]["miss_reason"] == "evicted", r.text
    assert (await cl.get(cache["id"])).json()["status"] == "ready"
    assert await _lifecycle(gateway, cache["id"]) == ["started"]
