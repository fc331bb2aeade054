"""The create-time budget check reads a running month-to-date spend: token usage recorded since
the last full computation counts at once, and the month's meters are computed in full again
only when the snapshot is older than the refresh interval."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from kvaas.billing import budget as budget_mod
from kvaas.billing.budget import SPEND_REFRESH_SECONDS, check_create_allowed, set_budget
from kvaas.config import Settings
from kvaas.db.base import utcnow
from kvaas.db.session import Database
from kvaas.metering.ledger import record_usage


@pytest.fixture
def full_computations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Tenant ids whose month's storage segments were loaded (a full computation each)."""
    seen: list[str] = []
    original = budget_mod.load_segments

    async def counting(session: Any, tenant_id: str, *args: Any) -> Any:
        seen.append(tenant_id)
        return await original(session, tenant_id, *args)

    monkeypatch.setattr(budget_mod, "load_segments", counting)
    return seen


async def test_running_total_counts_new_usage_without_a_full_computation(
    db: Database, make_tenant: Any, full_computations: list[str]
) -> None:
    tenant = await make_tenant("acme")
    settings = Settings(_env_file=None, budget_hard_limit=True)  # type: ignore[call-arg]
    now = utcnow()
    async with db.session() as s:
        await set_budget(s, tenant.id, 100, "USD")

    async def prefill(key: str, tokens: int) -> None:
        async with db.session() as s:
            await record_usage(
                s,
                idempotency_key=key,
                tenant_id=tenant.id,
                meter="prefill_tokens",
                quantity=tokens,
                occurred_at=now - timedelta(seconds=1),
            )
            await s.commit()

    await prefill("a", 500_000)  # $0.50 at $1.00 / 1M
    async with db.session() as s:
        status = await check_create_allowed(s, tenant, settings, now=now)
    assert status is not None and status.spend_minor == 50
    assert full_computations == [tenant.id]  # the first check of the month computes it

    await prefill("b", 300_000)
    async with db.session() as s:
        status = await check_create_allowed(s, tenant, settings, now=now + timedelta(seconds=1))
    assert status is not None and status.spend_minor == 80
    assert full_computations == [tenant.id]  # from the snapshot and the events since

    later = now + timedelta(seconds=SPEND_REFRESH_SECONDS + 1)
    async with db.session() as s:
        status = await check_create_allowed(s, tenant, settings, now=later)
    assert status is not None and status.spend_minor == 80
    assert full_computations == [tenant.id, tenant.id]  # a stale snapshot is recomputed
