"""The in-process engine's core process SIGKILLed: requests answer 503 ``engine_unavailable``
(not 500), a create interrupted by it leaves no pending version, ``/readyz`` and ``/healthz``
say so, the engine is started again and the service answers as before. With restarts off (or
spent), ``/healthz`` fails so that the supervisor restarts the process. A request past the
engine's time limit is aborted and answered the same way."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
import pytest
from kvtest.services import PgSchema
from sqlalchemy import select

from kvaas.db.models import Cache

from .conftest import Gateway, fault_settings, running_gateway

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

IDS = [(7 * i + 3) % 900 + 10 for i in range(300)]


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    pg = PgSchema()
    try:
        settings = fault_settings(tmp_path_factory.mktemp("engine-kill"), pg.url)
        async with running_gateway(settings) as g:
            yield g
    finally:
        pg.drop()


def engine_core_pids(g: Gateway) -> list[int]:
    """The pids of this gateway's engine core processes (not another gateway's)."""
    llm: Any = g.app.state.engine._llm
    manager = llm.engine_core.resources.engine_manager
    pids = [p.pid for p in manager.processes]
    assert pids and all(psutil.pid_exists(p) for p in pids)
    return pids


async def wait_for(predicate: Any, what: str, limit_s: float = 600.0) -> None:
    deadline = time.monotonic() + limit_s
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {limit_s:g} s")
        await asyncio.sleep(0.5)


async def attach(g: Gateway, cache_id: str, **kw: Any) -> Any:
    body = {"cache_id": cache_id, "token_ids": [5, 6, 7], "max_tokens": 2, "temperature": 0.0}
    return await g.client.post("/v1/cache/attach", json={**body, **kw}, headers=g.auth())


async def create(g: Gateway, ids: list[int]) -> Any:
    return await g.client.post(
        "/v1/cache/create", json={"token_ids": ids, "compression": "none"}, headers=g.auth()
    )


async def statuses(g: Gateway) -> list[str]:
    async with g.app.state.db.session() as s:
        return list((await s.execute(select(Cache.status))).scalars())


async def test_request_past_the_time_limit_is_503(gw: Gateway) -> None:
    r = await create(gw, IDS)
    assert r.status_code == 201, r.text
    engine = gw.app.state.engine
    engine._timeout_s = 1e-3  # every request is past it
    try:
        r = await attach(gw, r.json()["id"], max_tokens=64)
    finally:
        engine._timeout_s = gw.settings.engine_request_timeout_seconds
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "engine_unavailable"
    assert engine.liveness() == "ok"  # a slow request does not kill the engine


async def test_engine_core_killed_then_restarted(gw: Gateway) -> None:
    c = gw.client
    r = await create(gw, IDS)
    assert r.status_code == 201, r.text
    cache_id = r.json()["id"]
    assert (await attach(gw, cache_id)).status_code == 200
    # requests in flight when it dies: three attaches and a stream, each generating long
    # (one that happens to end before the kill answers 200: never a 500)
    inflight = [asyncio.create_task(attach(gw, cache_id, max_tokens=1500)) for _ in range(3)]
    inflight.append(asyncio.create_task(attach(gw, cache_id, max_tokens=1500, stream=True)))
    gate = gw.app.state.cache_service.gate

    async def generating() -> bool:
        return bool(gate.running >= 4)

    await wait_for(generating, "four requests generating", limit_s=120)
    for pid in engine_core_pids(gw):
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    *plain, streamed = await asyncio.gather(*inflight)
    codes = [r.status_code for r in plain]
    assert set(codes) <= {200, 503} and 503 in codes, codes
    for r in plain:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "engine_unavailable"
            assert r.headers["Retry-After"]
    if streamed.status_code == 200:  # its status line was sent: an error is in-band
        assert "internal_error" not in streamed.text
    else:  # it failed before its first token
        assert streamed.status_code == 503
        assert streamed.json()["error"]["type"] == "engine_unavailable"
    print(
        f"[fault] in flight at the kill: {codes.count(503)} of 3 attaches 503, stream: "
        f"{'engine_unavailable' if 'engine_unavailable' in streamed.text else 'completed'}"
    )

    # requests fail cleanly at once: no 500, no hang, nothing left pending
    r = await attach(gw, cache_id)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "engine_unavailable"
    r = await create(gw, [i + 1 for i in IDS])
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "engine_unavailable"
    assert "pending" not in await statuses(gw)
    r = await c.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2},
        headers=gw.auth(),
    )
    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"

    # the probes say so while it is away
    r = await c.get("/healthz")
    assert r.status_code == 200 and r.json()["engine"] in ("recovering", "ok")
    if r.json()["engine"] == "recovering":
        ready = await c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["components"]["engine"]["status"] == "down"

    async def ready() -> bool:
        return (await c.get("/readyz")).status_code == 200

    await wait_for(ready, "the engine's restart")
    print(f"[fault] in-process engine killed: ready again after {time.monotonic() - killed:.1f} s")
    assert gw.app.state.engine.deaths == 1
    assert (await c.get("/healthz")).json()["engine"] == "ok"
    r = await attach(gw, cache_id)
    assert r.status_code == 200, r.text
    assert r.json()["cache"]["hit"] is True  # the store kept the cache through the crash
    r = await create(gw, [i + 2 for i in IDS])
    assert r.status_code == 201, r.text


async def test_without_restarts_liveness_fails(gw: Gateway) -> None:
    engine = gw.app.state.engine
    assert engine.liveness() == "ok"
    engine._restart_attempts = 0  # as with KVAAS_ENGINE_RESTART_ATTEMPTS=0
    for pid in engine_core_pids(gw):
        os.kill(pid, signal.SIGKILL)

    async def down() -> bool:
        return (await gw.client.get("/healthz")).status_code == 503

    await wait_for(down, "/healthz failing", limit_s=60)
    body = (await gw.client.get("/healthz")).json()
    assert body["status"] == "down" and body["engine"] == "down"
    r = await create(gw, [i + 3 for i in IDS])
    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"
    assert (await gw.client.get("/readyz")).status_code == 503
