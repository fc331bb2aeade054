"""Idempotency-Key across a gateway's death, and bounded storage of responses: a create that
made its cache before the gateway died is answered with that cache on retry (no second
cache); a response too large to keep is not replayed and not run again; expired records are
deleted in batches (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import func, select

from kvaas.api.idempotency import request_hash, sweep_idempotency
from kvaas.db.base import utcnow
from kvaas.db.models import Cache, IdempotencyRecord, Tenant


async def _tenant(app, name: str) -> Tenant:  # type: ignore[no-untyped-def]
    async with app.state.db.session() as s:
        t = (await s.execute(select(Tenant).where(Tenant.name == name))).scalar_one()
        return t


async def test_retry_of_a_create_whose_gateway_died_answers_with_its_cache(make_app) -> None:  # type: ignore[no-untyped-def]
    """The create committed its cache and named it under the key, then the gateway died
    (the key is left ``in_flight``). After the lease, the retry is answered with that cache,
    stored as the key's response; no second create runs (this app has no engine: a create
    that ran would answer 503)."""
    async with make_app(idempotency_in_flight_lease_seconds=5) as api:
        tenant = await _tenant(api.app, "acme")
        now = utcnow()
        body = json.dumps({"prompt": "hello " * 300, "wait": True}).encode()
        scope = {"method": "POST", "path": "/v1/cache/create", "query_string": b""}
        async with api.app.state.db.session() as s:
            cache = Cache(
                tenant_id=tenant.id,
                model="tiny",
                model_fingerprint="f" * 32,
                status="ready",
                version=1,
                tokens=300,
                token_ids=b"",
                prefix_sha256="0" * 64,
                chunk_tokens=256,
                stored_chunks=1,
                stored_bytes=1000,
                scheme="int4",
                storage_class="standard",
                meta={},
                hit_count=0,
                ttl_seconds=3600,
                expires_at=now + timedelta(hours=1),
                created_at=now,
            )
            s.add(cache)
            await s.flush()
            s.add(
                IdempotencyRecord(
                    tenant_id=tenant.id,
                    key="create-1",
                    request_hash=request_hash(scope, body),
                    method="POST",
                    path="/v1/cache/create",
                    state="in_flight",
                    resource_id=cache.id,
                    created_at=now - timedelta(seconds=10),
                    expires_at=now + timedelta(hours=24),
                )
            )
            await s.commit()
        h = api.auth(**{"Idempotency-Key": "create-1", "Content-Type": "application/json"})
        r = await api.client.post("/v1/cache/create", content=body, headers=h)
        assert r.status_code == 201, r.text
        assert r.json()["id"] == cache.id and r.json()["status"] == "ready"
        assert r.headers["idempotent-replayed"] == "true"
        again = await api.client.post("/v1/cache/create", content=body, headers=h)
        assert again.status_code == 201 and again.json() == r.json()
        async with api.app.state.db.session() as s:
            n = await s.scalar(select(func.count()).select_from(Cache))
            rec = await s.get(IdempotencyRecord, (tenant.id, "create-1"))
        assert n == 1
        assert rec is not None and rec.state == "completed" and rec.response_status == 201


async def test_a_response_too_large_to_keep_is_not_run_again(make_app) -> None:  # type: ignore[no-untyped-def]
    """Above the stored limit the response passes whole but is not kept; the retry is told
    so (409 ``response_not_stored`` with the original status) and nothing runs twice."""
    async with make_app(idempotency_max_stored_bytes=1024) as api:
        h = api.auth(**{"Idempotency-Key": "big-1"})
        big = {"text": "x" * 4000}
        first = await api.client.post("/v1/test/orders", json=big, headers=h)
        assert first.status_code == 201 and first.json()["body"] == big
        retry = await api.client.post("/v1/test/orders", json=big, headers=h)
        assert retry.status_code == 409
        err = retry.json()["error"]
        assert err["reason"] == "response_not_stored" and err["status"] == 201
        assert len(api.effects.calls) == 1
        small = await api.client.post(
            "/v1/test/orders", json={"n": 1}, headers=api.auth(**{"Idempotency-Key": "s-1"})
        )
        replay = await api.client.post(
            "/v1/test/orders", json={"n": 1}, headers=api.auth(**{"Idempotency-Key": "s-1"})
        )
        assert replay.json() == small.json() and replay.headers["idempotent-replayed"] == "true"
        async with api.app.state.db.session() as s:
            tenant = await _tenant(api.app, "acme")
            rec = await s.get(IdempotencyRecord, (tenant.id, "big-1"))
        assert rec is not None and rec.response_body is None and rec.response_size > 4000


async def test_expired_records_are_deleted_in_batches(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        tenant = await _tenant(api.app, "acme")
        past = utcnow() - timedelta(seconds=1)
        async with api.app.state.db.session() as s:
            for i in range(1200):
                s.add(
                    IdempotencyRecord(
                        tenant_id=tenant.id,
                        key=f"old-{i}",
                        request_hash="0" * 64,
                        method="POST",
                        path="/v1/x",
                        state="completed",
                        created_at=past,
                        expires_at=past,
                    )
                )
            s.add(
                IdempotencyRecord(
                    tenant_id=tenant.id,
                    key="fresh",
                    request_hash="0" * 64,
                    method="POST",
                    path="/v1/x",
                    state="completed",
                    created_at=past,
                    expires_at=utcnow() + timedelta(hours=1),
                )
            )
            await s.commit()
        db = api.app.state.db
        assert await sweep_idempotency(db, batch=500, max_batches=2) == 1000
        assert await sweep_idempotency(db, batch=500, max_batches=2) == 200
        assert await sweep_idempotency(db, batch=500, max_batches=2) == 0
        async with db.session() as s:
            left = list((await s.execute(select(IdempotencyRecord.key))).scalars())
        assert left == ["fresh"]
