"""Metering end to end on the real engine: every cache action writes its usage in the same
transaction, and ``GET /v1/usage`` adds up to what the responses reported."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from kvtest.caches import corpus_ids, new_client
from sqlalchemy import select

from kvaas.db.base import utcnow
from kvaas.db.models import CacheLifecycleEvent, UsageEvent

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


async def test_actions_are_metered_and_reported(gateway) -> None:  # type: ignore[no-untyped-def]
    started = utcnow()
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)
    c = await cl.create(ids[:600], storage_class="standard")
    create_prefill = c["usage"]["prefill_tokens"]
    assert create_prefill == 600
    await asyncio.sleep(1.1)  # stored for at least one whole second in `standard`

    r = await cl.attach(cache_id=c["id"], token_ids=ids[600:620])
    assert r.status_code == 200, r.text
    attach = r.json()["usage"]
    assert attach["cached_tokens"] > 0

    r = await cl.request("PATCH", f"/v1/caches/{c['id']}", json={"storage_class": "cold"})
    assert r.status_code == 200, r.text
    r = await cl.request("POST", f"/v1/caches/{c['id']}/extend", json={"token_ids": ids[600:900]})
    assert r.status_code == 201, r.text  # a new version
    extend_prefill = r.json()["usage"]["prefill_tokens"]
    r = await cl.request("DELETE", f"/v1/caches/{c['id']}")
    assert r.status_code == 200, r.text  # the deleted cache object

    async with gateway.app.state.db.session() as s:
        kinds = (
            await s.scalars(
                select(CacheLifecycleEvent.kind)
                .where(CacheLifecycleEvent.cache_id == c["id"])
                .order_by(CacheLifecycleEvent.at, CacheLifecycleEvent.id)
            )
        ).all()
        meters = (
            await s.scalars(select(UsageEvent.meter).where(UsageEvent.cache_id == c["id"]))
        ).all()
    assert list(kinds) == ["started", "class_changed", "resized", "ended"]
    assert meters.count("cache_creations") == 1

    r = await cl.request(
        "GET",
        "/v1/usage",
        params={
            "from": (started - timedelta(hours=1)).isoformat(),
            "to": (utcnow() + timedelta(minutes=1)).isoformat(),
            "granularity": "hour",
        },
    )
    assert r.status_code == 200, r.text
    totals = r.json()["totals"]
    assert totals["cache_creations"] == 1
    assert totals["cached_tokens"] == attach["cached_tokens"]
    assert totals["output_tokens"] == attach["output_tokens"]
    assert totals["prefill_tokens"] == create_prefill + attach["prefill_tokens"] + extend_prefill
    # 600 tokens for each whole second in `standard`; then 600, later 900, tokens in `cold`
    storage = totals["storage_token_seconds"]
    assert storage.get("standard", 0) >= 600 and storage["standard"] % 600 == 0
    assert storage.get("hot", 0) == 0


async def test_other_tenants_usage_is_not_shown(gateway) -> None:  # type: ignore[no-untyped-def]
    a = await new_client(gateway)
    b = await new_client(gateway)
    await a.create(corpus_ids(gateway)[:300])
    r = await b.request("GET", "/v1/usage")
    assert r.status_code == 200, r.text
    assert r.json()["totals"]["cache_creations"] == 0
