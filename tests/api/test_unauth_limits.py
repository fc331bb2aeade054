"""Unauthenticated traffic is limited per client address: failed API-key authentication,
admin-token guesses and failed Stripe webhooks drain a per-address token bucket; once it is
empty the address gets ``429`` with ``Retry-After`` before any key lookup."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from kvtest.gateway import admin_headers
from kvtest.services import REDIS_URL

from kvaas.auth.keys import generate_key
from kvaas.db.repositories import ApiKeyRepository

BURST = 5


def _limits(backend: str) -> dict[str, object]:
    values: dict[str, object] = {
        "unauth_rate_limit_per_second": 0.01,  # one token per 100 s: none comes back here
        "unauth_rate_limit_burst": BURST,
    }
    if backend == "redis":
        values |= {"redis_url": REDIS_URL, "redis_prefix": f"ua-{secrets.token_hex(4)}"}
    return values


@asynccontextmanager
async def _client_at(app: FastAPI, address: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://kvaas.test") as c:
        yield c


def _random_key() -> dict[str, str]:
    return {"Authorization": f"Bearer {generate_key().plaintext}"}


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_failed_auth_flood_is_limited_without_key_lookups(  # type: ignore[no-untyped-def]
    make_app, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    lookups = 0
    get_with_tenant = ApiKeyRepository.get_with_tenant

    async def counting(self, prefix):  # type: ignore[no-untyped-def]
        nonlocal lookups
        lookups += 1
        return await get_with_tenant(self, prefix)

    async with make_app(**_limits(backend)) as api:
        monkeypatch.setattr(ApiKeyRepository, "get_with_tenant", counting)
        async with _client_at(api.app, "203.0.113.7") as attacker:
            statuses = [
                (await attacker.get("/v1/me", headers=_random_key())).status_code
                for _ in range(BURST + 8)
            ]
            assert statuses == [401] * (BURST + 1) + [429] * 7
            assert lookups == BURST + 1  # none once the address is limited
            limited = await attacker.get("/v1/me", headers=_random_key())
            assert limited.status_code == 429
            assert limited.json()["error"]["type"] == "rate_limit_error"
            assert int(limited.headers["retry-after"]) >= 1
            # the address is limited whatever it sends, a valid key included (no lookup)
            r = await attacker.get("/v1/me", headers=api.auth())
            assert r.status_code == 429 and lookups == BURST + 1
        # another address is not
        async with _client_at(api.app, "198.51.100.3") as other:
            assert (await other.get("/v1/me", headers=api.auth())).status_code == 200


async def test_successful_requests_do_not_drain_the_address_bucket(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(**_limits("memory")) as api:
        for _ in range(BURST * 4):
            assert (await api.client.get("/v1/me", headers=api.auth())).status_code == 200
        for _ in range(BURST * 4):
            r = await api.client.get("/admin/api/tenants", headers=admin_headers())
            assert r.status_code == 200


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_admin_token_guesses_are_limited(make_app, backend: str) -> None:  # type: ignore[no-untyped-def]
    async with make_app(tenants=(), **_limits(backend)) as api:
        async with _client_at(api.app, "203.0.113.8") as guesser:
            wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
            statuses = [
                (await guesser.get("/admin/api/tenants", headers=wrong)).status_code
                for _ in range(BURST + 3)
            ]
            assert statuses == [401] * (BURST + 1) + [429] * 2
            # the right token from that address waits too
            r = await guesser.get("/admin/api/tenants", headers=admin_headers())
            assert r.status_code == 429 and "retry-after" in r.headers
        r = await api.client.get("/admin/api/tenants", headers=admin_headers())
        assert r.status_code == 200


async def test_failed_stripe_webhooks_are_limited(make_app) -> None:  # type: ignore[no-untyped-def]
    async with (
        make_app(
            tenants=(), stripe_webhook_secret="whsec_test_0123456789", **_limits("memory")
        ) as api,
        _client_at(api.app, "203.0.113.9") as forger,
    ):
        bad = {"Stripe-Signature": "t=1,v1=" + "0" * 64}
        statuses = [
            (await forger.post("/v1/stripe/webhook", content=b"{}", headers=bad)).status_code
            for _ in range(BURST + 3)
        ]
        assert statuses == [400] * (BURST + 1) + [429] * 2


async def test_zero_rate_turns_the_address_limit_off(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(unauth_rate_limit_per_second=0, unauth_rate_limit_burst=1) as api:
        statuses = {
            (await api.client.get("/v1/me", headers=_random_key())).status_code for _ in range(20)
        }
        assert statuses == {401}
