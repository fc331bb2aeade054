"""Background saves in a real engine: a gateway whose vLLM worker saves chunks off the step
thread (``KVAAS_CONNECTOR_SAVE_QUEUE_BYTES`` above 0).

vLLM reports a prefill finished before its queued chunks are stored; the connector's report
says so (``pending_chunks``) and the gateway calls the cache ready only once every chunk is in
the store. A store write that fails in the background fails the create exactly as a failed
synchronous save does: 503, the cache ``failed``, "only n of m chunks reached the store".
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from kvtest.caches import corpus_ids, new_client
from kvtest.gateway import serving
from kvtest.services import PgSchema

from kvaas.connector.saver import RECOMMENDED_QUEUE_BYTES
from kvaas.services.caches import creation

from .conftest import engine_settings

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module")
async def bg_gateway(
    tmp_path_factory: pytest.TempPathFactory, engine_pg: PgSchema
) -> AsyncIterator[Any]:
    """A gateway (the session engine's settings) whose engine saves in the background."""
    settings = engine_settings(
        tmp_path_factory.mktemp("kvaas-bg"),
        engine_pg.url,
        connector_save_queue_bytes=RECOMMENDED_QUEUE_BYTES,
    )
    async with serving(settings, request_timeout_s=300) as (app, client):
        yield SimpleNamespace(app=app, client=client, settings=settings)


async def test_a_create_is_ready_only_with_every_chunk_stored(
    bg_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cl = await new_client(bg_gateway)
    ids = corpus_ids(bg_gateway)[:1300]  # five chunks, over two engine steps
    seen: list[dict[str, Any]] = []
    engine = bg_gateway.app.state.engine
    generate = engine.generate

    async def spy(*a: Any, **k: Any) -> Any:
        gen = await generate(*a, **k)
        seen.append(dict(gen.connector))
        return gen

    monkeypatch.setattr(engine, "generate", spy)
    cache = await cl.create(ids, compression="int8")
    assert cache["status"] == "ready" and cache["stored_tokens"] == 1300
    (report,) = seen
    assert report["saved_chunks"] + report["pending_chunks"] == 6  # five full, one partial
    assert "save_failed" not in report
    keys = await cl.keys(ids, "int8")
    assert all(await cl.service.store.sizes_many(keys))
    r = await cl.attach(cache_id=cache["id"], token_ids=ids[1300:1308], max_tokens=2)
    assert r.status_code == 200, r.text
    assert r.json()["cache"]["hit"] is True


async def test_a_write_failing_in_the_background_fails_the_create_as_before(
    bg_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(creation, "SAVE_WAIT_S", 5.0)  # a wait that cannot end in success
    cl = await new_client(bg_gateway)
    ids = corpus_ids(bg_gateway)[2000:3100]  # four full chunks and a partial one
    keys = await cl.keys(ids, "int4")
    disk = cl.service.store.tier("disk")
    blocker = disk.path_of(keys[1]).parent  # a file where chunk 1's directory must go
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")
    try:
        r = await cl.request(
            "POST",
            "/v1/cache/create",
            json={"token_ids": ids, "compression": "int4", "storage_class": "cold"},
        )
    finally:
        blocker.unlink()
    assert r.status_code == 503, r.text
    reason = re.search(r"only [01] of 5 chunks reached the store", r.json()["error"]["message"])
    assert reason is not None, r.text
    (cache,) = (await cl.request("GET", "/v1/caches", params={"status": "failed"})).json()["data"]
    assert cache["failure_reason"].endswith(reason.group(0)), cache
