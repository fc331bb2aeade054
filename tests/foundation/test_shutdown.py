"""Shutdown: the gateway's background work ends before its database connections are closed.

The maintenance loop is cancelled at shutdown. A step cancelled mid-transaction must roll back
and give its connection back before the pool is disposed; a task left pending past the
lifespan keeps its connection open and its transaction's locks held (a migration or a schema
drop then waits for ever).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kvtest.gateway import ADMIN_TOKEN, new_tenant, running_app
from kvtest.services import PgSchema

pytestmark = pytest.mark.postgres


async def test_no_connection_outlives_the_lifespan(pg_schema: PgSchema, tmp_path: Path) -> None:
    # rounds back to back: whenever shutdown comes, a step is almost surely mid-way
    async with running_app(
        data_dir=tmp_path / "data",
        database_url=pg_schema.url,
        admin_token=ADMIN_TOKEN,
        maintenance_interval_seconds=0.001,
    ) as (_app, c):
        await new_tenant(c, "acme")
        await asyncio.sleep(0.5)
        assert pg_schema.open_connections(), "the app holds connections while it runs"
    # no await between the lifespan's end and the look: a pending task gets no chance to
    # close anything late
    assert pg_schema.open_connections() == []
