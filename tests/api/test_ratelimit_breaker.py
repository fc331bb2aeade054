"""The rate limiter behind a circuit breaker: while Redis is down, requests are limited by the
in-process buckets and Redis is not tried again until the breaker's next probe (no connect
timeout per request)."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from kvaas.api.ratelimit import Decision, RedisLimiter
from kvaas.store.breaker import CircuitBreaker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Redis server of this test's own, on a free port (the test kills it)."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        for _ in range(200):  # until it accepts connections
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise RuntimeError("redis-server exited") from None
                time.sleep(0.05)
        yield url, proc
    finally:
        client.close()
        proc.kill()
        proc.wait()


async def test_redis_down_limits_in_process_and_opens_the_breaker(  # type: ignore[no-untyped-def]
    own_redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, proc = own_redis
    # a breaker whose next probe is far away: every later request must skip Redis
    breaker = CircuitBreaker(base_delay=3600.0, max_delay=3600.0)
    limiter = RedisLimiter(
        url, rate=0.01, burst=2, prefix=f"rb-{secrets.token_hex(4)}", breaker=breaker
    )
    attempts = 0
    redis_take = RedisLimiter._redis_take

    async def counting(self: RedisLimiter, bucket: str) -> Decision:
        nonlocal attempts
        attempts += 1
        return await redis_take(self, bucket)

    monkeypatch.setattr(RedisLimiter, "_redis_take", counting)
    try:
        up = [(await limiter.take("key-a")).allowed for _ in range(3)]
        assert up == [True, True, False] and attempts == 3
        assert breaker.state == "closed"

        proc.kill()
        proc.wait()
        down = [(await limiter.take("key-b")).allowed for _ in range(5)]
        assert down == [True, True, False, False, False]  # limited in the process
        assert attempts == 4  # one failed attempt opened the breaker; the rest skipped Redis
        assert breaker.state == "open" and breaker.failures == 1
        # another key has its own in-process bucket
        assert (await limiter.take("key-c")).allowed
        assert attempts == 4
    finally:
        await limiter.aclose()


async def test_the_app_keeps_limiting_while_its_redis_is_down(make_app, own_redis) -> None:  # type: ignore[no-untyped-def]
    url, proc = own_redis
    async with make_app(
        redis_url=url,
        redis_prefix=f"rb-{secrets.token_hex(4)}",
        rate_limit_per_second=0.01,
        rate_limit_burst=2,
    ) as api:
        r = [
            (await api.client.get("/v1/me", headers=api.auth("acme"))).status_code for _ in range(3)
        ]
        assert r == [200, 200, 429]
        proc.kill()
        proc.wait()
        r = [
            (await api.client.get("/v1/me", headers=api.auth("globex"))).status_code
            for _ in range(4)
        ]
        assert r == [200, 200, 429, 429]
        limiter = api.app.state.rate_limiter
        assert limiter.breaker.state == "open"
