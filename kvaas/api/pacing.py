"""Answering refusals after a pause, so a client that retries at once cannot flood the gateway.

A tenant over its limits gets ``429`` (its engine slots taken: ``engine_busy``; its request rate
spent: ``rate_limit_error``) with ``Retry-After``. A client that honours it waits. One that
retries at once, in a loop on each of its connections, turns every refusal into another request
at the speed the gateway can refuse them: measured with ``bench/fairness.py`` on a 2-core
machine, 40 such workers drew about 130 refusals a second, and the CPU and event-loop turns
spent refusing them are taken from every other tenant's requests in the same process.

:class:`RefusalPacingMiddleware` holds each ``429`` for ``KVAAS_REFUSAL_PACE_SECONDS`` before it
is sent (an ``asyncio`` sleep: no CPU, one idle coroutine per held answer). A looping client's
rate is then at most one try per pace per connection, whatever it does; a client that waits
``Retry-After`` (whole seconds, longer than the pace) sees no difference. Only the answer is
held: whatever refused the request (the fair gate, the rate limiter, a quota) has already
decided and released what it held. 0 turns pacing off.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: the status whose answers are held
PACED_STATUS = 429


class RefusalPacingMiddleware:
    """Holds every ``429`` answer ``pace_s`` seconds before its first byte is sent."""

    def __init__(self, app: ASGIApp, pace_s: float) -> None:
        if pace_s < 0:
            raise ValueError("pace_s must not be negative")
        self.app = app
        self.pace_s = pace_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.pace_s <= 0:
            await self.app(scope, receive, send)
            return

        async def paced(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == PACED_STATUS:
                await asyncio.sleep(self.pace_s)
            await send(message)

        await self.app(scope, receive, paced)
