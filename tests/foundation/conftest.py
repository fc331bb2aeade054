"""Fixtures for gateway tests: an app with its lifespan running, and an HTTP client to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from kvtest.gateway import ADMIN_TOKEN, running_app

AppFactory = Callable[..., AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient]]]


@pytest.fixture
def make_client(database_url: str, tmp_path: Path) -> AppFactory:
    """``async with make_client(**settings) as (app, client)``: an app on ``database_url``."""

    @asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "database_url": database_url,
            "admin_token": ADMIN_TOKEN,
            "database_timeout_seconds": 2.0,
        }
        async with running_app(**{**values, **overrides}) as (app, c):
            yield app, c

    return factory


@pytest.fixture
async def client(make_client: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as (_app, c):
        yield c
