"""Internals never reach tenants: engine node URLs and their answers, Redis addresses, file
paths and exception texts stay out of error messages, ``failure_reason`` and the public
``/readyz``. Tenants get a clear message and the request id; the details go to the log (with
the request id) and to the admin API (the audit log and the admin view of ``/readyz``)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvtest.gateway import ADMIN_TOKEN, admin_headers, new_tenant, running_app

from kvaas.engine import EngineError, Sampling
from kvaas.engine.model_info import ModelInfo
from kvaas.engine.remote import RemoteEngine
from kvaas.model_presets import resolve_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _assert_clean(text: str | None, *secrets: str) -> None:
    """``text`` names none of ``secrets`` nor any network address or exception text."""
    assert text, "a tenant always gets a message"
    for s in (*secrets, "127.0.0.1", "http://", "redis://", "Connect call", "Error 111"):
        assert s not in text, f"{s!r} leaked into {text!r}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model's directory, built once for the module."""
    return str(resolve_model("tiny", tmp_path_factory.mktemp("models")))


@asynccontextmanager
async def _gateway(
    database_url: str, tmp_path: Path, tiny: str, **values: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str], str]]:
    """A gateway whose engine is one ``vllm serve`` node that is not there: (client, the
    tenant's auth header, tenant id)."""
    settings: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "rate_limit_per_second": 0,
        "engine": "remote",
        "model": tiny,
        **values,
    }
    async with running_app(**settings) as (_app, c):
        tenant, key = await new_tenant(c, "acme")
        yield c, {"Authorization": f"Bearer {key}"}, tenant["id"]


async def _failed(c: httpx.AsyncClient, auth: dict[str, str], cache_id: str) -> dict[str, Any]:
    for _ in range(200):
        body: dict[str, Any] = (await c.get(f"/v1/caches/{cache_id}", headers=auth)).json()
        if body["status"] != "pending":
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"cache {cache_id} still pending")


async def test_engine_failure_hides_the_node_url(
    database_url: str, tmp_path: Path, tiny: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    node = f"127.0.0.1:{port}"
    caplog.set_level(logging.INFO)
    async with _gateway(database_url, tmp_path, tiny, engine_urls=[f"http://{node}"]) as (
        c,
        auth,
        tid,
    ):
        ids = list(range(1000, 1300))
        r = await c.post("/v1/cache/create", json={"token_ids": ids}, headers=auth)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        _assert_clean(err["message"], node, str(port))
        assert "engine" in err["message"]
        rid = err["request_id"]
        assert rid and r.headers["x-request-id"] == rid
        # the operator finds the details in the log, under the request id
        assert any(rid in m and node in m for m in caplog.messages), caplog.messages

        r = await c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, headers=auth)
        assert r.status_code == 503, r.text
        _assert_clean(r.json()["error"]["message"], node, str(port))

        r = await c.post("/v1/cache/create", json={"token_ids": ids, "wait": False}, headers=auth)
        assert r.status_code == 202, r.text
        cache = await _failed(c, auth, r.json()["id"])
        assert cache["status"] == "failed"
        _assert_clean(cache["failure_reason"], node, str(port))
        versions = (await c.get(f"/v1/caches/{cache['id']}/versions", headers=auth)).json()
        _assert_clean(versions["data"][0]["failure_reason"], node, str(port))

        # ... and the admin API shows what failed
        audit = await c.get("/admin/api/audit", params={"tenant_id": tid}, headers=admin_headers())
        failures = [e for e in audit.json()["data"] if e["action"] == "cache.prefill_failed"]
        assert {e["target_id"] for e in failures} >= {cache["id"]}
        assert all(node in e["details"]["detail"] for e in failures)


async def test_store_failure_hides_the_redis_address(
    database_url: str, tmp_path: Path, tiny: str
) -> None:
    port = _free_port()
    redis = f"127.0.0.1:{port}"
    values = {
        "engine_urls": [f"http://127.0.0.1:{_free_port()}"],
        "redis_url": f"redis://{redis}/0",
    }
    async with _gateway(database_url, tmp_path, tiny, **values) as (c, auth, _tid):
        ids = list(range(1000, 1300))
        r = await c.post("/v1/cache/create", json={"token_ids": ids}, headers=auth)
        assert r.status_code == 503, r.text
        _assert_clean(r.json()["error"]["message"], redis, str(port))
        r = await c.post("/v1/cache/create", json={"token_ids": ids, "wait": False}, headers=auth)
        if r.status_code == 202:
            cache = await _failed(c, auth, r.json()["id"])
            _assert_clean(cache["failure_reason"], redis, str(port))
        else:
            _assert_clean(r.json()["error"]["message"], redis, str(port))


async def test_readyz_shows_error_text_to_the_admin_only(database_url: str, tmp_path: Path) -> None:
    port = _free_port()
    settings = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "rate_limit_per_second": 0,
        "redis_url": f"redis://127.0.0.1:{port}/0",
    }
    async with running_app(**settings) as (_app, c):
        public = await c.get("/readyz")
        assert public.status_code == 503
        body = public.json()
        assert body["components"]["redis"]["status"] == "down"
        assert body["components"]["database"]["status"] == "ok"
        assert all(
            comp["detail"] is None
            for comp in body["components"].values()
            if comp["status"] == "down"
        )
        assert str(port) not in public.text

        admin = await c.get("/readyz", headers=admin_headers())
        assert admin.status_code == 503
        assert str(port) in (admin.json()["components"]["redis"]["detail"] or "")

        wrong = await c.get("/readyz", headers={"Authorization": "Bearer " + "x" * 40})
        assert wrong.status_code == 401


async def test_remote_engine_errors_keep_node_and_answer_internal(tiny: str) -> None:
    engine = RemoteEngine(ModelInfo.load(Path(tiny), "tiny", "auto"), ["http://10.1.2.3:8123"])

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="Traceback: /opt/vllm/worker.py line 12, KeyError")

    await engine.shutdown()
    engine._client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    try:
        with pytest.raises(EngineError) as e:
            await engine.generate([1, 2, 3], Sampling(max_tokens=1))
    finally:
        await engine.shutdown()
    _assert_clean(str(e.value), "10.1.2.3", "8123", "/opt/vllm", "Traceback", "KeyError")
    assert "10.1.2.3:8123" in e.value.detail and "/opt/vllm/worker.py" in e.value.detail
