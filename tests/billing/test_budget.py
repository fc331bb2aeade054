"""Budgets: spend so far this month, thresholds recorded once, the hard limit."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from kvaas.billing.budget import BudgetExceeded, check_create_allowed
from kvaas.config import Settings
from kvaas.db.base import utcnow
from kvaas.db.models import BudgetAlert
from kvaas.db.session import Database
from kvaas.metering.ledger import record_usage


async def _prefill(db: Database, tenant_id: str, key: str, tokens: int) -> None:
    async with db.session() as s:
        await record_usage(
            s,
            idempotency_key=key,
            tenant_id=tenant_id,
            meter="prefill_tokens",
            quantity=tokens,
            occurred_at=utcnow() - timedelta(seconds=1),
        )
        await s.commit()


async def test_budget_thresholds_and_hard_limit(db: Database, make_keyed_tenant, make_app) -> None:
    tenant, key = await make_keyed_tenant("acme")
    auth = {"Authorization": f"Bearer {key}"}
    async with make_app() as (_app, client):
        r = await client.get("/v1/budget", headers=auth)
        assert r.status_code == 200 and r.json()["amount_minor"] is None
        r = await client.put("/v1/budget", json={"amount": "1.00", "currency": "USD"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["amount_minor"] == 100 and r.json()["thresholds_crossed"] == []
        bad = await client.put(
            "/v1/budget", json={"amount": "1.001", "currency": "USD"}, headers=auth
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "amount"
        eur = await client.put(
            "/v1/budget", json={"amount_minor": 5, "currency": "EUR"}, headers=auth
        )
        assert eur.status_code == 400 and eur.json()["error"]["param"] == "currency"
        both = await client.put(
            "/v1/budget", json={"amount": "1", "amount_minor": 100, "currency": "USD"}, headers=auth
        )
        assert both.status_code == 422

        await _prefill(db, tenant.id, "p1", 850_000)  # $0.85 at $1.00 / 1M: past 80 %
        for _ in range(2):
            body = (await client.get("/v1/budget", headers=auth)).json()
            assert body["spend_minor"] == 85 and body["percent_used"] == "85.0"
            assert [t["threshold_pct"] for t in body["thresholds_crossed"]] == [80]

    soft = Settings(_env_file=None, budget_hard_limit=False)  # type: ignore[call-arg]
    hard = Settings(_env_file=None, budget_hard_limit=True)  # type: ignore[call-arg]
    async with db.session() as s:
        status = await check_create_allowed(s, tenant, hard)  # 85 %: allowed
        assert status is not None and not status.exhausted
    await _prefill(db, tenant.id, "p2", 200_000)  # $1.05
    async with db.session() as s:
        status = await check_create_allowed(s, tenant, soft)
        assert status is not None and status.exhausted  # recorded, not refused
        with pytest.raises(BudgetExceeded) as err:
            await check_create_allowed(s, tenant, hard)
        assert err.value.status_code == 402 and err.value.type == "budget_exceeded"
        assert err.value.extra == {"budget_minor": 100, "spend_minor": 105}
        alerts = (await s.scalars(select(BudgetAlert).order_by(BudgetAlert.threshold_pct))).all()
    assert [(a.threshold_pct, a.spend_minor) for a in alerts] == [(80, 85), (100, 105)]


async def test_no_budget_costs_nothing(db: Database, make_tenant) -> None:
    t = await make_tenant("acme")
    hard = Settings(_env_file=None, budget_hard_limit=True)  # type: ignore[call-arg]
    async with db.session() as s:
        assert await check_create_allowed(s, t, hard) is None
