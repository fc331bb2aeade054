"""One real vLLM engine (the tiny model, CPU) behind one gateway for the whole test session.

The gateway runs on PostgreSQL, with Redis (a private key prefix) and a disk tier; the engine's
worker adds a memory tier. vLLM's own prefix cache is off, so every attach goes through the
KVaaS connector and the store.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from kvtest.gateway import ADMIN_TOKEN, new_tenant, serving
from kvtest.services import REDIS_URL, PgSchema

from kvaas.config import Settings


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings
    api_key: str
    other_key: str

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.api_key}"}


@pytest.fixture(scope="session")
def engine_pg() -> Iterator[PgSchema]:
    schema = PgSchema()
    try:
        yield schema
    finally:
        schema.drop()


def engine_settings(data_dir: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "engine": "inprocess",
        "model": "tiny",
        "redis_url": REDIS_URL,
        "redis_prefix": f"kvtest-{secrets.token_hex(4)}",
        "memory_tier_bytes": 256 * 1024 * 1024,
        "disk_tier_bytes": 4 * 1024**3,
        "chunk_tokens": 256,
        "engine_max_model_len": 4096,
        "engine_max_batched_tokens": 1024,
        "engine_prefix_caching": False,
        # attaches read the shared tiers (the paths these tests check: sealing, tampering,
        # lost chunks), not a copy the worker kept when it saved; warming is tested in
        # tests/store/test_tiered.py and tests/engine/test_routing_nodes.py
        "connector_warm_on_save": False,
        "engine_kv_cache_gib": 1.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory, engine_pg: PgSchema
) -> AsyncIterator[Gateway]:
    settings = engine_settings(tmp_path_factory.mktemp("kvaas"), engine_pg.url)
    async with serving(settings, request_timeout_s=300) as (app, client):
        _a, first = await new_tenant(client, "engine-a")
        _b, second = await new_tenant(client, "engine-b")
        yield Gateway(app, client, settings, first, second)


@pytest.fixture(scope="session")
async def served_gateway(gateway: Gateway) -> AsyncIterator[str]:
    """The ``gateway`` app over real HTTP (uvicorn on 127.0.0.1, same event loop, same engine):
    its base URL. Use async clients, or sync ones from a thread."""
    from kvtest.serve import serve

    async with serve(gateway.app) as url:
        yield url
