"""A ``429`` is held ``refusal_pace_seconds`` before it is sent (``kvaas.api.pacing``): a client
that retries at once in a loop gets one try per pace per connection; other answers are not held."""

from __future__ import annotations

import time

import pytest

PACE_S = 1.0


@pytest.mark.parametrize("pace", [PACE_S, 0.0])
async def test_a_refusal_is_held_for_the_pace_and_nothing_else_is(make_app, pace: float) -> None:  # type: ignore[no-untyped-def]
    async with make_app(
        rate_limit_per_second=0.01, rate_limit_burst=2, refusal_pace_seconds=pace
    ) as api:
        answers: list[tuple[int, float]] = []
        for _ in range(4):  # a client retrying at once, in a loop
            began = time.monotonic()
            r = await api.client.get("/v1/me", headers=api.auth())
            answers.append((r.status_code, time.monotonic() - began))
        assert [s for s, _ in answers] == [200, 200, 429, 429]
        refused = [t for s, t in answers if s == 429]
        if pace:
            assert all(t >= PACE_S for t in refused), answers
            # the admitted ones were answered at once (far inside the pace)
            assert all(t < PACE_S / 2 for s, t in answers if s == 200), answers
        else:
            assert all(t < PACE_S / 2 for t in refused), answers
        # the held answer is the limiter's, whole: status, body and Retry-After
        r = await api.client.get("/v1/me", headers=api.auth())
        assert r.status_code == 429 and "Retry-After" in r.headers
        assert r.json()["error"]["type"] == "rate_limit_error"


def test_a_negative_pace_is_refused() -> None:
    from starlette.applications import Starlette

    from kvaas.api.pacing import RefusalPacingMiddleware

    with pytest.raises(ValueError):
        RefusalPacingMiddleware(Starlette(), pace_s=-1)
