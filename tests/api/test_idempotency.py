"""Idempotency-Key on POST: replay, conflicts, in-flight requests, expiry, limits."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import func, select, update

from kvaas.db.base import utcnow
from kvaas.db.models import IdempotencyRecord


async def test_same_key_same_body_replays_without_a_second_side_effect(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        h = api.auth(**{"Idempotency-Key": "order-1"})
        first = await api.client.post("/v1/test/orders", json={"item": "a"}, headers=h)
        second = await api.client.post("/v1/test/orders", json={"item": "a"}, headers=h)
        assert first.status_code == second.status_code == 201
        assert (
            first.json()
            == second.json()
            == {
                "order": 1,
                "tenant": "acme",
                "body": {"item": "a"},
            }
        )
        assert second.headers["location"] == first.headers["location"] == "/v1/test/orders/1"
        assert second.headers["content-type"] == "application/json"
        assert second.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers
        assert second.headers["x-request-id"] != first.headers["x-request-id"]
        assert len(api.effects.calls) == 1
        # without the header every request runs
        await api.client.post("/v1/test/orders", json={"item": "a"}, headers=api.auth())
        assert len(api.effects.calls) == 2


async def test_same_key_other_body_is_a_conflict(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        h = api.auth(**{"Idempotency-Key": "k-conflict"})
        assert (
            await api.client.post("/v1/test/orders", json={"n": 1}, headers=h)
        ).status_code == 201
        r = await api.client.post("/v1/test/orders", json={"n": 2}, headers=h)
        assert r.status_code == 409
        err = r.json()["error"]
        assert err["type"] == "idempotency_conflict"
        assert err["reason"] == "request_mismatch"
        assert err["request_id"] == r.headers["x-request-id"]
        # another path with the same key is another request too
        r = await api.client.post("/v1/test/slow", json={"n": 1}, headers=h)
        assert r.status_code == 409
        assert len(api.effects.calls) == 1


async def test_keys_belong_to_a_tenant(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        for tenant in ("acme", "globex"):
            r = await api.client.post(
                "/v1/test/orders",
                json={"x": 1},
                headers=api.auth(tenant, **{"Idempotency-Key": "shared"}),
            )
            assert r.status_code == 201 and r.json()["tenant"] == tenant
        assert len(api.effects.calls) == 2


async def test_in_flight_key_is_a_conflict_then_replays(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        h = api.auth(**{"Idempotency-Key": "slow-1"})
        first = asyncio.create_task(api.client.post("/v1/test/slow", json={}, headers=h))
        await api.effects.entered.wait()
        r = await api.client.post("/v1/test/slow", json={}, headers=h)
        assert r.status_code == 409
        assert r.json()["error"]["type"] == "idempotency_conflict"
        assert r.json()["error"]["reason"] == "in_flight"
        assert r.headers["retry-after"] == "1"
        api.effects.release.set()
        done = await first
        assert done.status_code == 200 and done.json() == {"done": 1}
        again = await api.client.post("/v1/test/slow", json={}, headers=h)
        assert again.json() == {"done": 1} and again.headers["idempotent-replayed"] == "true"
        assert len(api.effects.calls) == 1


async def test_retryable_answers_are_not_stored(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        h = api.auth(**{"Idempotency-Key": "flaky-1"})
        for _ in range(2):
            r = await api.client.post("/v1/test/flaky", json={}, headers=h)
            assert r.status_code == 503 and "idempotent-replayed" not in r.headers
        assert len(api.effects.calls) == 2
        # a real route: no engine here, so create answers 503 each time and stores nothing
        for _ in range(2):
            r = await api.client.post(
                "/v1/cache/create",
                json={"prompt": "x"},
                headers=api.auth(**{"Idempotency-Key": "c1"}),
            )
            assert r.status_code == 503 and "idempotent-replayed" not in r.headers
        async with api.app.state.db.session() as s:
            n = await s.scalar(select(func.count()).select_from(IdempotencyRecord))
        assert n == 0


async def test_streamed_response_is_stored_whole(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        h = api.auth(**{"Idempotency-Key": "stream-1"})
        first = await api.client.post("/v1/test/stream", json={}, headers=h)
        second = await api.client.post("/v1/test/stream", json={}, headers=h)
        assert first.text == second.text == "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        assert second.headers["content-type"].startswith("text/event-stream")
        assert len(api.effects.calls) == 1


async def test_expired_keys_run_again(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(idempotency_ttl_seconds=3600) as api:
        h = api.auth(**{"Idempotency-Key": "exp-1"})
        await api.client.post("/v1/test/orders", json={"a": 1}, headers=h)
        async with api.app.state.db.session() as s:
            rec = (await s.execute(select(IdempotencyRecord))).scalar_one()
            assert timedelta(minutes=59) < rec.expires_at - rec.created_at <= timedelta(hours=1)
            await s.execute(
                update(IdempotencyRecord).values(expires_at=utcnow() - timedelta(seconds=1))
            )
            await s.commit()
        r = await api.client.post("/v1/test/orders", json={"a": 2}, headers=h)
        assert r.status_code == 201 and r.json()["order"] == 2
        assert "idempotent-replayed" not in r.headers


async def test_key_limits_and_unauthenticated_requests(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(idempotency_key_max_length=16) as api:
        r = await api.client.post(
            "/v1/test/orders", json={}, headers=api.auth(**{"Idempotency-Key": "x" * 17})
        )
        assert r.status_code == 422
        assert r.json()["error"]["type"] == "validation_error"
        assert r.json()["error"]["param"] == "Idempotency-Key"
        ok = await api.client.post(
            "/v1/test/orders", json={}, headers=api.auth(**{"Idempotency-Key": "x" * 16})
        )
        assert ok.status_code == 201
        # a bad key is answered by the app (401) and leaves nothing behind
        bad = {"Authorization": "Bearer kvs_nope_nope", "Idempotency-Key": "u1"}
        for _ in range(2):
            r = await api.client.post("/v1/test/orders", json={}, headers=bad)
            assert r.status_code == 401 and "idempotent-replayed" not in r.headers
        assert len(api.effects.calls) == 1
