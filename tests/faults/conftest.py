"""Fault injection with real processes: each test module here starts what it breaks (its own
engine, its own PostgreSQL, its own vLLM node) so that killing it leaves the shared services
and the other tests' engine alone."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from kvtest.gateway import ADMIN_TOKEN, new_tenant, serving
from kvtest.services import REDIS_URL

from kvaas.config import Settings


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings
    api_key: str

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def fault_settings(data_dir: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings of a gateway with the tiny model on the CPU (as tests/engine uses)."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "engine": "inprocess",
        "model": "tiny",
        "redis_url": REDIS_URL,
        "redis_prefix": f"kvfault-{secrets.token_hex(4)}",
        "memory_tier_bytes": 64 * 1024 * 1024,
        "disk_tier_bytes": 1024**3,
        "chunk_tokens": 256,
        "engine_max_model_len": 2048,
        "engine_max_batched_tokens": 1024,
        "engine_prefix_caching": False,
        "engine_kv_cache_gib": 1.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@asynccontextmanager
async def running_gateway(settings: Settings, tenant: str = "fault") -> AsyncIterator[Gateway]:
    """``settings``' app with its lifespan running, an in-process client and a tenant's key."""
    async with serving(settings, request_timeout_s=300) as (app, client):
        _t, key = await new_tenant(client, tenant)
        yield Gateway(app, client, settings, key)
