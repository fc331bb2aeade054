"""Per-API-key rate limits: token buckets in the process and in real Redis."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from kvtest.services import REDIS_URL

from kvaas.api.ratelimit import MemoryLimiter, RedisLimiter


async def _burst(api, n: int, tenant: str = "acme") -> list:  # type: ignore[no-untyped-def]
    return [await api.client.get("/v1/me", headers=api.auth(tenant)) for _ in range(n)]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_429_after_the_burst_with_retry_after(make_app, backend: str) -> None:  # type: ignore[no-untyped-def]
    extra = {"redis_url": REDIS_URL, "redis_prefix": f"rl-{secrets.token_hex(4)}"}
    async with make_app(
        rate_limit_per_second=0.01, rate_limit_burst=3, **(extra if backend == "redis" else {})
    ) as api:
        responses = await _burst(api, 5)
        assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
        assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["2", "1", "0", "0", "0"]
        limited = responses[3]
        err = limited.json()["error"]
        assert err["type"] == "rate_limit_error"
        assert err["request_id"] == limited.headers["x-request-id"]
        # one token per 100 s: the next one is that far away
        assert 60 < int(limited.headers["retry-after"]) <= 100
        # another key has its own bucket; requests without an API key are not limited here
        assert (await _burst(api, 1, "globex"))[0].status_code == 200
        assert (await api.client.get("/healthz")).status_code == 200
        # a made-up key cannot drain a real key's bucket, and gets 401 from the app
        r = await api.client.get("/v1/me", headers={"Authorization": "Bearer kvs_abcdefgh_x"})
        assert r.status_code in (401, 429)


async def test_redis_buckets_are_shared_by_workers(make_app) -> None:  # type: ignore[no-untyped-def]
    settings = {
        "redis_url": REDIS_URL,
        "redis_prefix": f"rl-{secrets.token_hex(4)}",
        "rate_limit_per_second": 0.01,
        "rate_limit_burst": 4,
    }
    async with make_app(**settings) as one:
        assert all(r.status_code == 200 for r in await _burst(one, 2))
        async with make_app(tenants=(), **settings) as two:  # same database and Redis
            two.keys.update(one.keys)
            assert [r.status_code for r in await _burst(two, 3)] == [200, 200, 429]
            assert (await _burst(one, 1))[0].status_code == 429


async def test_limiters_refill() -> None:
    """An empty bucket says how long until the next token, and has it after that long
    (on Redis's clock and on the process's)."""
    redis = RedisLimiter(REDIS_URL, rate=100.0, burst=2, prefix=f"rl-{secrets.token_hex(4)}")
    memory = MemoryLimiter(rate=100.0, burst=2)
    try:
        for limiter in (redis, memory):
            bucket = secrets.token_hex(8)
            denied = None
            for _ in range(1000):
                d = await limiter.take(bucket)
                if not d.allowed:
                    denied = d
                    break
            assert denied is not None and 0 < denied.retry_after_s <= 0.01 + 1e-9
            await asyncio.sleep(denied.retry_after_s + 0.005)
            assert (await limiter.take(bucket)).allowed
    finally:
        await redis.aclose()


async def test_redis_outage_limits_in_process(make_app) -> None:  # type: ignore[no-untyped-def]
    """Unreachable Redis: the buckets of this process take over (limits still hold)."""
    async with make_app(
        redis_url="redis://127.0.0.1:1/0", rate_limit_per_second=0.01, rate_limit_burst=1
    ) as api:
        assert [r.status_code for r in await _burst(api, 3)] == [200, 429, 429]
