"""``POST /v1/cache/estimate`` on the real engine: token count, stored bytes that match a real
create, prices from the price book and the break-even point."""

from __future__ import annotations

import os
from decimal import Decimal

import pytest

pytestmark = [pytest.mark.engine]

PROMPT = open(os.__file__).read()[:5000]  # noqa: SIM115


async def test_estimate_matches_a_real_create(gateway) -> None:  # type: ignore[no-untyped-def]
    c, auth = gateway.client, gateway.auth()
    model = gateway.app.state.cache_service.engine.model
    r = await c.post(
        "/v1/cache/estimate",
        json={
            "prompt": PROMPT,
            "compression": "int4",
            "storage_class": "standard",
            "ttl_seconds": 10_800,
            "expected_attaches": 20,
        },
        headers=auth,
    )
    assert r.status_code == 200, r.text
    est = r.json()
    assert est["tokens"] == len(model.encode(PROMPT))
    assert est["stored_tokens"] == est["tokens"] > 0  # the partial last chunk is stored too
    # tiny: 4 layers x 2 KV heads x head_dim 64 x K and V x fp32
    assert est["kv_bytes_per_token"] == 4 * 2 * 64 * 2 * 4
    sizes = est["stored_bytes_by_compression"]
    assert sizes["none"]["exact"] and not sizes["lossless"]["exact"]
    assert sizes["none"]["bytes"] > sizes["int8"]["bytes"] > sizes["int4"]["bytes"]
    assert sizes["int4"]["ratio"] > 6  # 4-bit codes against fp32
    # the estimate equals what a real create stores
    created = await c.post(
        "/v1/cache/create", json={"prompt": PROMPT, "compression": "int4"}, headers=auth
    )
    assert created.status_code == 201, created.text
    assert created.json()["stored_bytes"] == est["stored_bytes"] == sizes["int4"]["bytes"]
    # prices from the price book in force (2026-10: standard 1.00 per 1M token-hours)
    pb = gateway.app.state.pricebook
    tokens = Decimal(est["tokens"])
    assert Decimal(est["storage_price_per_hour"]) == tokens * Decimal("1.00") / 1_000_000
    assert Decimal(est["storage_cost_for_ttl"]) == 3 * Decimal(est["storage_price_per_hour"])
    assert est["currency"] == pb.currency
    # break-even: the first attach count where caching costs no more than re-sending
    n = est["break_even_attaches"]
    fixed = Decimal(est["create_cost"]) + Decimal(est["storage_cost_for_ttl"])
    gain = Decimal(est["resend_cost"]) - Decimal(est["attach_cost"])
    assert fixed <= n * gain and (n == 1 or fixed > (n - 1) * gain)
    exp = est["expected"]
    assert Decimal(exp["savings"]) == Decimal(exp["without_cache"]) - Decimal(exp["with_cache"])


async def test_estimate_validates_input(gateway) -> None:  # type: ignore[no-untyped-def]
    c, auth = gateway.client, gateway.auth()
    both = await c.post("/v1/cache/estimate", json={"prompt": "a", "token_ids": [1]}, headers=auth)
    assert both.status_code == 400
    bad = await c.post("/v1/cache/estimate", json={"token_ids": [10**7]}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "token_ids"
    ok = await c.post("/v1/cache/estimate", json={"token_ids": [5] * 300}, headers=auth)
    assert ok.status_code == 200 and ok.json()["tokens"] == 300
    anon = await c.post("/v1/cache/estimate", json={"prompt": "a"})
    assert anon.status_code == 401
