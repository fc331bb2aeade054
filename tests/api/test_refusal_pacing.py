"""A ``429`` is held ``refusal_pace_seconds`` before it is sent (``kvaas.api.pacing``): a client
that retries at once in a loop gets one try per pace per connection; other answers are not held.

No assertion here bounds how fast an answer comes on a busy machine: "held" is shown with lower
bounds only (a held answer cannot come early, however idle the machine), "not held" by order
(an answer asked for after a refusal began its pace arrives while the refusal is still held).
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

PACE_S = 1.0
#: the longest pace the settings accept: the refusal below is held this long
LONG_PACE_S = 5.0
#: far beyond any answer that is not held, on the busiest machine
DEADLINE_S = 60.0


async def test_an_admitted_answer_is_not_held_while_a_refusal_is(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(
        rate_limit_per_second=0.01, rate_limit_burst=1, refusal_pace_seconds=LONG_PACE_S
    ) as api:

        def me(tenant: str) -> asyncio.Future[object]:
            return asyncio.ensure_future(api.client.get("/v1/me", headers=api.auth(tenant)))

        assert (await asyncio.wait_for(me("acme"), DEADLINE_S)).status_code == 200
        began = time.monotonic()
        refused = me("acme")  # its burst spent: refused, and held for the pace
        await asyncio.sleep(0.05)  # the refusal is on its way before the next request begins
        other = await asyncio.wait_for(me("globex"), DEADLINE_S)  # another tenant, admitted
        assert other.status_code == 200  # type: ignore[attr-defined]
        assert not refused.done(), "the refusal was sent before the admitted answer"
        r = await asyncio.wait_for(refused, DEADLINE_S)
        assert r.status_code == 429  # type: ignore[attr-defined]
        assert time.monotonic() - began >= LONG_PACE_S


async def test_a_refusal_waits_the_pace_then_comes_whole(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(
        rate_limit_per_second=0.01, rate_limit_burst=2, refusal_pace_seconds=PACE_S
    ) as api:
        statuses, refused_s = [], []
        for _ in range(4):  # a client retrying at once, in a loop
            began = time.monotonic()
            r = await asyncio.wait_for(api.client.get("/v1/me", headers=api.auth()), DEADLINE_S)
            statuses.append(r.status_code)
            if r.status_code == 429:
                refused_s.append(time.monotonic() - began)
                # the held answer is the limiter's, whole: status, body and Retry-After
                assert "Retry-After" in r.headers
                assert r.json()["error"]["type"] == "rate_limit_error"
        assert statuses == [200, 200, 429, 429]
        assert all(t >= PACE_S for t in refused_s), refused_s


@pytest.mark.parametrize("pace", [PACE_S, 0.0])
async def test_only_refusals_are_paused_and_none_without_a_pace(  # type: ignore[no-untyped-def]
    make_app, monkeypatch: pytest.MonkeyPatch, pace: float
) -> None:
    """Which answers the middleware pauses, and for how long, read from its own pauses (the
    tests above show a pause really holds the answer)."""
    from kvaas.api import pacing

    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await asyncio.sleep(seconds)

    monkeypatch.setattr(pacing, "asyncio", SimpleNamespace(sleep=sleep))
    async with make_app(
        rate_limit_per_second=0.01, rate_limit_burst=1, refusal_pace_seconds=pace
    ) as api:
        statuses = []
        for _ in range(3):
            r = await asyncio.wait_for(api.client.get("/v1/me", headers=api.auth()), DEADLINE_S)
            statuses.append(r.status_code)
        assert statuses == [200, 429, 429]
        assert pauses == ([pace, pace] if pace else [])


def test_a_negative_pace_is_refused() -> None:
    from starlette.applications import Starlette

    from kvaas.api.pacing import RefusalPacingMiddleware

    with pytest.raises(ValueError):
        RefusalPacingMiddleware(Starlette(), pace_s=-1)
