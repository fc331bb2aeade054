"""Per-API-key request rate limits: a token bucket per key.

Each API key has a bucket of ``burst`` tokens refilled at ``rate`` tokens per second; a request
takes one token, and a request finding the bucket empty is answered ``429 rate_limit_error``
with ``Retry-After`` (whole seconds until a token is back). With ``KVAAS_REDIS_URL`` set the
buckets live in Redis and are updated by one Lua script (atomic, on Redis's clock), so every
gateway worker shares them; otherwise they live in the process.

The bucket of a request is named by a hash of its bearer credential, and only credentials
shaped like API keys are limited: a made-up key gets a bucket of its own and cannot drain a
real key's bucket. Should Redis fail, requests pass (the limiter fails open) rather than
taking the API down with it.

:class:`RateLimitMiddleware` is plain ASGI, so it covers every route, streaming included.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvaas.api.asgi import error_response_messages
from kvaas.auth.keys import parse_key
from kvaas.errors import RateLimited

log = logging.getLogger("kvaas.ratelimit")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of taking one token."""

    allowed: bool
    remaining: int
    retry_after_s: float

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class Limiter(Protocol):
    rate: float
    burst: int

    async def take(self, bucket: str) -> Decision: ...

    async def aclose(self) -> None: ...


class MemoryLimiter:
    """Token buckets in this process (one gateway worker)."""

    def __init__(self, rate: float, burst: int, *, max_buckets: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_buckets = max_buckets
        self._buckets: dict[str, tuple[float, float]] = {}  # bucket -> (tokens, at)

    async def take(self, bucket: str) -> Decision:
        now = time.monotonic()
        tokens, at = self._buckets.get(bucket, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            decision = Decision(True, int(tokens), 0.0)
        else:
            decision = Decision(False, 0, (1.0 - tokens) / self.rate)
        if bucket not in self._buckets and len(self._buckets) >= self.max_buckets:
            self._forget_full(now)
        self._buckets[bucket] = (tokens, now)
        return decision

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled completely (they equal a fresh bucket)."""
        full_after = self.burst / self.rate
        for name, (_, at) in list(self._buckets.items()):
            if now - at >= full_after:
                del self._buckets[name]

    async def aclose(self) -> None:
        self._buckets.clear()


#: KEYS[1]: bucket hash; ARGV: rate (tokens/s), burst. Returns {allowed, remaining, wait_ms}.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local allowed = 0
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait_ms = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, math.floor(tokens), wait_ms}
"""


class RedisLimiter:
    """Token buckets in Redis, shared by every worker that uses the same Redis and prefix."""

    def __init__(
        self, url: str, rate: float, burst: int, *, prefix: str = "kvaas", cluster: bool = False
    ) -> None:
        self.url = url
        self.rate = rate
        self.burst = burst
        self.prefix = prefix
        self.cluster = cluster
        self._client: Any = None
        self._script: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            from redis.asyncio import Redis
            from redis.asyncio.cluster import RedisCluster

            opts: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
            if self.cluster:
                self._client = RedisCluster.from_url(self.url, **opts)
            else:
                self._client = Redis.from_url(self.url, **opts)
            self._script = self._client.register_script(TOKEN_BUCKET_LUA)
            self._loop = loop
        return self._script

    def key(self, bucket: str) -> str:
        return f"{self.prefix}:rl:{{{bucket}}}"

    async def take(self, bucket: str) -> Decision:
        script = self._ensure()
        allowed, remaining, wait_ms = await script(
            keys=[self.key(bucket)], args=[repr(self.rate), self.burst]
        )
        return Decision(bool(int(allowed)), int(remaining), int(wait_ms) / 1000.0)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def build_limiter(settings: Any) -> Limiter | None:
    """The limiter the settings ask for; ``None`` when rate limiting is off."""
    if settings.rate_limit_per_second <= 0:
        return None
    if settings.redis_url:
        return RedisLimiter(
            settings.redis_url,
            settings.rate_limit_per_second,
            settings.rate_limit_burst,
            prefix=settings.redis_prefix,
            cluster=settings.redis_cluster,
        )
    return MemoryLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)


def bucket_of(scope: Scope) -> str | None:
    """The bucket name of a request: a hash of its bearer API key, or ``None`` (not limited)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            credential = credential.strip()
            if scheme.lower() != "bearer" or parse_key(credential) is None:
                return None
            return hashlib.sha256(credential.encode()).hexdigest()[:32]
    return None


class RateLimitMiddleware:
    """Answers ``429`` once an API key's bucket is empty; adds ``X-RateLimit-Limit`` and
    ``X-RateLimit-Remaining`` to the responses of limited requests."""

    def __init__(self, app: ASGIApp, *, limiter: Limiter | None) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._closing_send(send))
            return
        bucket = bucket_of(scope) if scope["type"] == "http" and self.limiter else None
        if bucket is None or self.limiter is None:
            await self.app(scope, receive, send)
            return
        try:
            decision = await self.limiter.take(bucket)
        except Exception as e:  # fail open: the limiter must not take the API down
            log.warning("rate limiter unavailable, request passes: %s", e)
            await self.app(scope, receive, send)
            return
        limit_headers = [
            (b"x-ratelimit-limit", str(self.limiter.burst).encode()),
            (b"x-ratelimit-remaining", str(decision.remaining).encode()),
        ]
        if not decision.allowed:
            err = RateLimited(
                f"too many requests for this API key (at most {self.limiter.rate:g}/s, "
                f"bursts of {self.limiter.burst}); retry after {decision.retry_after_header} s",
                headers={"Retry-After": decision.retry_after_header},
            )
            for message in error_response_messages(scope, err, extra_headers=limit_headers):
                await send(message)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *limit_headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _closing_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete" and self.limiter is not None:
                try:
                    await self.limiter.aclose()
                except Exception as e:  # closing is best effort
                    log.debug("closing the rate limiter failed: %s", e)
            await send(message)

        return wrapped
