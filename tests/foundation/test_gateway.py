"""Gateway behaviour: health, readiness, metrics, request ids, error format, limits."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest
from kvtest.gateway import admin_headers, new_tenant
from kvtest.services import POSTGRES_URL, PgSchema
from kvtest.tcpproxy import TcpProxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = await client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert body["components"]["database"]["status"] == "ok"
    assert "redis" not in body["components"]


async def test_readyz_reports_redis(make_client, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    async with make_client(redis_url=redis_url) as (_app, c):
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json()["components"]["redis"]["status"] == "ok"
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    async with make_client(redis_url=dead) as (_app, c):
        r = await c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "down"
        assert body["components"]["redis"]["status"] == "down"
        assert body["components"]["database"]["status"] == "ok"


async def test_every_response_has_a_request_id(client: httpx.AsyncClient) -> None:
    responses = [
        await client.get("/healthz"),
        await client.get("/nope"),
        await client.get("/v1/me"),
        await client.post("/admin/api/tenants", content=b"{", headers=admin_headers()),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids) and len(set(ids)) == len(ids)
    for r in responses[1:]:
        assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    r = await client.get("/healthz", headers={"X-Request-ID": "client-chosen-id-42"})
    assert r.headers["x-request-id"] == "client-chosen-id-42"
    r = await client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"].startswith("req_")


async def test_unknown_route_is_a_404_in_the_error_format(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/does-not-exist")
    assert r.status_code == 404
    assert set(r.json()["error"]) >= {"type", "message", "request_id"}


async def test_invalid_json_and_invalid_field_are_422(client: httpx.AsyncClient) -> None:
    h = {**admin_headers(), "content-type": "application/json"}
    r = await client.post("/admin/api/tenants", content=b"{not json", headers=h)
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "validation_error"
    assert "JSON" in r.json()["error"]["message"]
    r = await client.post(
        "/admin/api/tenants",
        json={"name": "x", "storage_quota_tokens": -5},
        headers=admin_headers(),
    )
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "storage_quota_tokens"
    r = await client.post("/admin/api/tenants", json={"nam": "x"}, headers=admin_headers())
    assert r.status_code == 422 and r.json()["error"]["param"] in ("name", "nam")


async def test_oversized_body_is_413(make_client) -> None:  # type: ignore[no-untyped-def]
    async with make_client(max_request_bytes=4096) as (_app, c):
        body = b'{"name": "' + b"a" * 5000 + b'"}'
        r = await c.post("/admin/api/tenants", content=body, headers=admin_headers())
        assert r.status_code == 413
        err = r.json()["error"]
        assert err["type"] == "payload_too_large" and "4096" in err["message"]
        assert r.headers["x-request-id"] == err["request_id"]

        async def chunks():  # no Content-Length: the limit holds while streaming too
            for _ in range(10):
                yield b"a" * 1000

        r = await c.post("/admin/api/tenants", content=chunks(), headers=admin_headers())
        assert r.status_code == 413
        # below the limit is fine
        r = await c.post("/admin/api/tenants", json={"name": "small"}, headers=admin_headers())
        assert r.status_code == 201


async def test_prompt_routes_refuse_a_body_no_prompt_could_need_unread(make_client) -> None:  # type: ignore[no-untyped-def]
    """A body larger than any prompt the context holds (at 32 characters per token, each
    JSON-escaped) is refused on the prompt routes by its declared length, before it is read or
    parsed; other routes keep the general limit."""
    from kvaas.services.prompts import prompt_body_limit

    async with make_client(engine_max_model_len=256) as (_app, c):
        limit = prompt_body_limit(256)
        body = b'{"prompt": "' + b"a" * limit + b'"}'
        read: list[int] = []

        async def counted():  # the body, counting what the server pulls of it
            for i in range(0, len(body), 65536):
                read.append(i)
                yield body[i : i + 65536]

        hdrs = {"Content-Length": str(len(body)), "Authorization": "Bearer kv-nobody"}
        for path in (
            "/v1/cache/create",
            "/v1/cache/attach",
            "/v1/caches/c1/extend",
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/cache/estimate",
        ):
            read.clear()
            r = await c.post(path, content=counted(), headers=hdrs)
            assert r.status_code == 413, (path, r.text)
            assert f"limit of {limit} bytes" in r.json()["error"]["message"]
            assert len(read) <= 1, path  # refused on its header: at most one chunk was pulled
        # the general limit still applies elsewhere: the same size is read on other routes
        r = await c.post("/admin/api/tenants", content=body, headers=admin_headers())
        assert r.status_code == 422, r.text


async def test_metrics_exposes_request_counters(client: httpx.AsyncClient) -> None:
    await client.get("/healthz")
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert 'kvaas_http_requests_total{method="GET",route="/healthz",status="200"}' in r.text


@pytest.mark.postgres
async def test_database_outage_gives_503_and_recovers(make_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL reached through a proxy we cut: readiness and API say 503, then recover."""
    from sqlalchemy.engine import make_url

    target = make_url(POSTGRES_URL)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    schema = PgSchema()
    url = make_url(schema.url).set(host="127.0.0.1", port=proxy.port)
    try:
        async with make_client(database_url=url.render_as_string(hide_password=False)) as (_app, c):
            _t, key = await new_tenant(c, "acme")
            auth = {"Authorization": f"Bearer {key}"}
            assert (await c.get("/v1/me", headers=auth)).status_code == 200

            await proxy.stop()
            r = await c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["components"]["database"]["status"] == "down"
            r = await c.get("/v1/me", headers=auth)
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["type"] == "service_unavailable" and "database" in err["message"]
            assert (await c.get("/healthz")).status_code == 200  # the process keeps running

            await proxy.start()
            for _ in range(50):
                if (await c.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await c.get("/readyz")).status_code == 200
            assert (await c.get("/v1/me", headers=auth)).status_code == 200
    finally:
        await proxy.stop()
        schema.drop()
