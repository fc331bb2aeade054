"""Usage of engine requests without a cache: recorded for the tenant, once per request id."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from kvaas.db.models import UsageEvent
from kvaas.db.session import Database
from kvaas.metering import hooks
from kvaas.metering.storage import meter_usage

T0 = datetime(2026, 9, 10, 12, 0, 0, tzinfo=UTC)
SEP = (datetime(2026, 9, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC))


async def test_inference_is_metered_once_per_request(db: Database, make_tenant) -> None:
    t = await make_tenant("acme")
    for _ in range(3):  # a retried recording (a stream's end seen twice) counts once
        async with db.session() as s:
            await hooks.on_inference(
                s, t.id, prefill_tokens=40, output_tokens=7, request_id="cmpl-1", at=T0
            )
            await s.commit()
    async with db.session() as s:
        await hooks.on_inference(
            s, t.id, prefill_tokens=5, output_tokens=0, request_id="cmpl-2", at=T0
        )
        await s.commit()
        rows = (await s.scalars(select(UsageEvent).where(UsageEvent.tenant_id == t.id))).all()
        usage = await meter_usage(s, t.id, *SEP)
    assert sorted((r.meter, r.quantity) for r in rows) == [
        ("output_tokens", 7),
        ("prefill_tokens", 5),
        ("prefill_tokens", 40),
    ]
    assert all(r.cache_id is None and r.details["op"] == "inference" for r in rows)
    assert (usage.prefill_tokens, usage.output_tokens) == (45, 7)  # what the invoice bills
