"""Request rate limits: a token bucket per API key, and one per client address for failed
authentication.

Each API key has a bucket of ``burst`` tokens refilled at ``rate`` tokens per second; a request
takes one token, and a request finding the bucket empty is answered ``429 rate_limit_error``
with ``Retry-After`` (whole seconds until a token is back). With ``KVAAS_REDIS_URL`` set the
buckets live in Redis and are updated by one Lua script (atomic, on Redis's clock), so every
gateway worker shares them; otherwise they live in the process. Should Redis fail, a circuit
breaker opens and the buckets of this process take over until a probe finds Redis again: limits
still hold, and no request waits for a connect timeout while Redis is down.

The bucket of a request is named by a hash of its bearer credential, and only credentials
shaped like API keys are limited: a made-up key gets a bucket of its own and cannot drain a
real key's bucket.

Failed authentication is limited per client address (:class:`AddressGuard`): each answer that
says the caller did not authenticate (``401``; on the admin API also ``403``; on the Stripe
webhook any ``4xx`` of a bad or missing signature) takes a token from the address's bucket. Once
that bucket is empty the address is refused (``429``) on every API route until a token is
back, before any key is looked up, so a flood of made-up keys costs no database work.

:class:`RateLimitMiddleware` is plain ASGI, so it covers every route, streaming included.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvaas.api.asgi import error_response_messages
from kvaas.auth.keys import parse_key
from kvaas.errors import RateLimited
from kvaas.store.breaker import CircuitBreaker

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
    """Token buckets in Redis, shared by every worker that uses the same Redis and prefix.

    Calls to Redis go through ``breaker``: a failed call opens it, and while it is open (until
    its next probe) buckets are taken from ``fallback``, this process's own, without trying
    Redis. :meth:`take` never raises for a Redis failure."""

    def __init__(
        self,
        url: str,
        rate: float,
        burst: int,
        *,
        prefix: str = "kvaas",
        cluster: bool = False,
        timeout_s: float = 1.0,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.url = url
        self.rate = rate
        self.burst = burst
        self.prefix = prefix
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.breaker = breaker or CircuitBreaker()
        self.fallback = MemoryLimiter(rate, burst)
        self._client: Any = None
        self._script: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            from redis.asyncio import Redis
            from redis.asyncio.cluster import RedisCluster

            opts: dict[str, Any] = {
                "socket_timeout": self.timeout_s,
                "socket_connect_timeout": self.timeout_s,
            }
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
        if not self.breaker.allow():
            return await self.fallback.take(bucket)
        try:
            decision = await self._redis_take(bucket)
        except Exception as e:  # any Redis failure: limit in this process meanwhile
            first = not self.breaker.is_down
            self.breaker.record_failure(e)
            (log.warning if first else log.debug)(
                "rate limiter: Redis failed (%s); limiting in this process, next try in %.1f s",
                e or type(e).__name__,
                self.breaker.seconds_until_retry(),
            )
            return await self.fallback.take(bucket)
        if self.breaker.is_down:
            log.warning("rate limiter: Redis answers again; buckets are shared again")
        self.breaker.record_success()
        return decision

    async def _redis_take(self, bucket: str) -> Decision:
        """One token from ``bucket`` in Redis (raises when Redis fails or is slow)."""
        script = self._ensure()
        async with asyncio.timeout(2 * self.timeout_s):
            allowed, remaining, wait_ms = await script(
                keys=[self.key(bucket)], args=[repr(self.rate), self.burst]
            )
        return Decision(bool(int(allowed)), int(remaining), int(wait_ms) / 1000.0)

    async def aclose(self) -> None:
        await self.fallback.aclose()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _limiter(settings: Any, rate: float, burst: int) -> Limiter | None:
    if rate <= 0:
        return None
    if settings.redis_url:
        return RedisLimiter(
            settings.redis_url,
            rate,
            burst,
            prefix=settings.redis_prefix,
            cluster=settings.redis_cluster,
        )
    return MemoryLimiter(rate, burst)


def build_limiter(settings: Any) -> Limiter | None:
    """The per-API-key limiter the settings ask for; ``None`` when it is off."""
    return _limiter(settings, settings.rate_limit_per_second, settings.rate_limit_burst)


def build_address_guard(settings: Any) -> AddressGuard | None:
    """The per-address limit of failed authentication; ``None`` when it is off."""
    limiter = _limiter(
        settings, settings.unauth_rate_limit_per_second, settings.unauth_rate_limit_burst
    )
    return AddressGuard(limiter) if limiter is not None else None


#: Where the admin API and the Stripe webhook live (their own kinds of failed authentication).
ADMIN_PREFIX = "/admin/"
WEBHOOK_PATH = "/v1/stripe/webhook"
#: Routes an address that failed authentication too often is refused on.
GUARDED_PREFIXES = ("/v1/", ADMIN_PREFIX)


def failed_authentication(path: str, status: int) -> bool:
    """Whether a ``status`` answer on ``path`` says its caller did not authenticate."""
    if path.startswith(ADMIN_PREFIX):
        return status in (401, 403)  # wrong admin token, or the admin API is off
    if path == WEBHOOK_PATH:
        return status in (400, 401, 403)  # bad or missing signature, webhooks off
    return status == 401


def client_address(scope: Scope) -> str:
    """The client's address (the peer, or what a trusted proxy forwarded; see uvicorn's
    ``--forwarded-allow-ips``)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class AddressGuard:
    """Per-address buckets of failed authentication, and the addresses that emptied theirs.

    :meth:`failed` takes a token from the address's bucket (shared through Redis when the
    limiter is); when none is left the address is kept here with the time its next token is
    back, and :meth:`retry_after` answers from that record alone, so a refused request costs
    neither a key lookup nor a Redis call. At most ``max_blocked`` addresses are kept (the
    oldest go first)."""

    def __init__(
        self,
        limiter: Limiter,
        *,
        max_blocked: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.max_blocked = max_blocked
        self._clock = clock
        self._blocked: dict[str, float] = {}  # address -> when a token is back

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or ``None`` when it is not refused."""
        until = self._blocked.get(address)
        if until is None:
            return None
        left = until - self._clock()
        if left <= 0:
            del self._blocked[address]
            return None
        return left

    async def failed(self, address: str) -> None:
        """Count one failed authentication from ``address``."""
        decision = await self.limiter.take(f"addr:{address}")
        if decision.allowed:
            return
        now = self._clock()
        if address not in self._blocked and len(self._blocked) >= self.max_blocked:
            for name, until in list(self._blocked.items()):
                if until <= now:
                    del self._blocked[name]
            while len(self._blocked) >= self.max_blocked:
                del self._blocked[next(iter(self._blocked))]
        self._blocked[address] = now + decision.retry_after_s


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
    """Answers ``429`` once an API key's bucket is empty, and on every API route to an address
    that failed authentication too often; adds ``X-RateLimit-Limit`` and
    ``X-RateLimit-Remaining`` to the responses of key-limited requests."""

    def __init__(
        self, app: ASGIApp, *, limiter: Limiter | None, guard: AddressGuard | None = None
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._closing_send(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        address = client_address(scope)
        guard = self.guard if path.startswith(GUARDED_PREFIXES) else None
        if guard is not None:
            wait = guard.retry_after(address)
            if wait is not None:
                retry = Decision(False, 0, wait).retry_after_header
                err = RateLimited(
                    f"too many failed authentications from this address; retry after {retry} s",
                    headers={"Retry-After": retry},
                )
                for message in error_response_messages(scope, err):
                    await send(message)
                return
        limit_headers: list[tuple[bytes, bytes]] = []
        bucket = bucket_of(scope) if self.limiter is not None else None
        if bucket is not None and self.limiter is not None:
            decision = await self.limiter.take(bucket)
            limit_headers = [
                (b"x-ratelimit-limit", str(self.limiter.burst).encode()),
                (b"x-ratelimit-remaining", str(decision.remaining).encode()),
            ]
            if not decision.allowed:
                err = RateLimited(
                    f"too many requests for this API key (at most {self.limiter.rate:g}/s, "
                    f"bursts of {self.limiter.burst}); retry after "
                    f"{decision.retry_after_header} s",
                    headers={"Retry-After": decision.retry_after_header},
                )
                for message in error_response_messages(scope, err, extra_headers=limit_headers):
                    await send(message)
                return
        if guard is None and not limit_headers:
            await self.app(scope, receive, send)
            return

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if guard is not None and failed_authentication(path, message["status"]):
                    await guard.failed(address)
                if limit_headers:
                    message = {**message, "headers": [*message.get("headers", []), *limit_headers]}
            await send(message)

        await self.app(scope, receive, watching_send)

    def _closing_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                for limiter in (self.limiter, self.guard.limiter if self.guard else None):
                    if limiter is None:
                        continue
                    try:
                        await limiter.aclose()
                    except Exception as e:  # closing is best effort
                        log.debug("closing a rate limiter failed: %s", e)
            await send(message)

        return wrapped
