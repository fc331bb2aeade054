"""Fixtures for the dashboard's server-side tests: an app without an engine on each database,
and a client of its dashboard (not yet logged in)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kvtest.dashboard import Dash
from kvtest.gateway import ADMIN_TOKEN, running_app


@pytest.fixture
async def dash(database_url: str, tmp_path: Path) -> AsyncIterator[Dash]:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "rate_limit_per_second": 0,
    }
    async with running_app(None, **values) as (app, client):
        yield Dash(client, app)
