"""Usage event ids are opaque: a tenant's ids say nothing about how many events the platform
records, nor in which order; they still page ``/v1/usage/events`` as cursors."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kvtest.gateway import ADMIN_TOKEN, new_tenant, running_app

from kvaas.metering.ledger import record_usage

ID = re.compile(r"^ue_[0-9a-f]{24}$")


async def test_usage_event_ids_are_opaque_cursors(database_url: str, tmp_path: Path) -> None:
    settings = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "rate_limit_per_second": 0,
    }
    async with running_app(**settings) as (app, c):
        acme, key = await new_tenant(c, "acme")
        other, _ = await new_tenant(c, "globex")
        at = datetime(2026, 10, 5, 10, 0, tzinfo=UTC)
        async with app.state.db.session() as s:
            for i in range(6):  # another tenant's events fall between acme's
                for t in (acme, other):
                    await record_usage(
                        s,
                        idempotency_key=f"{t['id']}-{i}",
                        tenant_id=t["id"],
                        meter="output_tokens",
                        quantity=10 + i,
                        occurred_at=at + timedelta(seconds=i),
                    )
            await s.commit()
        auth = {"Authorization": f"Bearer {key}"}
        first = (await c.get("/v1/usage/events", params={"limit": 3}, headers=auth)).json()
        assert first["has_more"]
        ids = [e["id"] for e in first["data"]]
        assert all(isinstance(i, str) and ID.match(i) for i in ids), ids
        rest = await c.get("/v1/usage/events", params={"limit": 10, "after": ids[-1]}, headers=auth)
        assert rest.status_code == 200, rest.text
        more = rest.json()
        assert not more["has_more"]
        assert [e["quantity"] for e in first["data"] + more["data"]] == [10, 11, 12, 13, 14, 15]
        every = ids + [e["id"] for e in more["data"]]
        assert len(set(every)) == 6
        bad = await c.get("/v1/usage/events", params={"after": "ue_0"}, headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
