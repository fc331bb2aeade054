"""Helpers for the dashboard's tests: a client that logs in and posts forms with their CSRF
token, and test data (cache rows with their lifecycle, attach usage) written straight to the
metadata database as the services would leave them."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from kvaas.dashboard.auth import CSRF_FIELD
from kvaas.db.models import Cache, CacheVersion
from kvaas.db.session import Database
from kvaas.metering.ledger import record_lifecycle, record_usage
from kvtest.gateway import ADMIN_TOKEN

_CSRF = re.compile(rf'name="{CSRF_FIELD}" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    m = _CSRF.search(html)
    assert m, "the page has no form with a CSRF token"
    return m.group(1)


@dataclass
class Dash:
    """A client of the dashboard (cookies kept) and its app."""

    client: httpx.AsyncClient
    app: Any

    @property
    def db(self) -> Database:
        return self.app.state.db

    async def login(self, token: str = ADMIN_TOKEN) -> httpx.Response:
        form = await self.client.get("/admin/login")
        return await self.client.post(
            "/admin/login", data={"token": token, CSRF_FIELD: csrf_of(form.text), "next": "/admin"}
        )

    async def csrf(self, path: str = "/admin/tenants") -> str:
        r = await self.client.get(path)
        assert r.status_code == 200, r.text
        return csrf_of(r.text)

    async def post(
        self, path: str, data: dict[str, str], page: str = "/admin/tenants"
    ) -> httpx.Response:
        return await self.client.post(path, data={**data, CSRF_FIELD: await self.csrf(page)})


async def seed_cache(
    db: Database,
    tenant_id: str,
    *,
    name: str | None = None,
    tokens: int = 512,
    storage_class: str = "standard",
    model: str = "tiny",
    stored_bytes: int = 4096,
    expires_in: timedelta = timedelta(hours=1),
    created_at: datetime | None = None,
) -> str:
    """A ready cache (version 1) of ``tenant_id`` whose storage started at ``created_at``."""
    now = created_at or datetime.now(UTC)
    ids = bytes(4 * tokens)
    cache = Cache(
        id=f"cache_{secrets.token_hex(12)}",
        tenant_id=tenant_id,
        name=name,
        model=model,
        model_fingerprint="f" * 16,
        status="ready",
        version=1,
        tokens=tokens,
        token_ids=ids,
        prefix_sha256=hashlib.sha256(ids).hexdigest(),
        chunk_tokens=256,
        stored_chunks=tokens // 256,
        stored_bytes=stored_bytes,
        scheme="int8",
        storage_class=storage_class,
        ttl_seconds=int(expires_in.total_seconds()),
        expires_at=datetime.now(UTC) + expires_in,
        created_at=now,
        updated_at=now,
    )
    async with db.session() as s:
        s.add(cache)
        s.add(
            CacheVersion(
                cache_id=cache.id,
                version=1,
                status="ready",
                tokens=tokens,
                token_ids=ids,
                prefix_sha256=cache.prefix_sha256,
                chunks=tokens // 256,
                stored_bytes=stored_bytes,
                created_at=now,
            )
        )
        await s.flush()
        await record_lifecycle(
            s,
            idempotency_key=f"lc:{cache.id}:started",
            tenant_id=tenant_id,
            cache_id=cache.id,
            kind="started",
            at=now,
            tokens=tokens,
            storage_class=storage_class,
            bytes_by_tier={"disk" if storage_class == "cold" else "redis": stored_bytes},
        )
        await s.commit()
    return cache.id


async def seed_attach(
    db: Database,
    tenant_id: str,
    cache_id: str,
    *,
    cached: int,
    prefill: int,
    at: datetime | None = None,
) -> None:
    """One attach's usage: ``cached`` tokens read from the cache, ``prefill`` computed."""
    at = at or datetime.now(UTC)
    rid = secrets.token_hex(8)
    async with db.session() as s:
        for meter, qty in (("cached_tokens", cached), ("prefill_tokens", prefill)):
            await record_usage(
                s,
                idempotency_key=f"attach:{rid}:{meter}",
                tenant_id=tenant_id,
                meter=meter,
                quantity=qty,
                occurred_at=at,
                cache_id=cache_id,
                details={"op": "attach"},
            )
        await s.commit()
