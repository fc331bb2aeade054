"""The engine gate on the real gateway: a tenant at its in-flight cap queues, one past its
queue is refused (429 ``engine_busy``) on every engine route, before any of its work, and
another tenant's request is admitted at once meanwhile. Asserted on the gate's state, not on
time."""

from __future__ import annotations

import asyncio

import pytest
from kvtest.caches import Gate, corpus_ids, new_client

from kvaas.services.fairness import FairGate

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


async def test_a_noisy_tenant_waits_in_its_own_queue(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    service = gateway.app.state.cache_service
    gate = FairGate(capacity=2, per_tenant=1, max_queue=1, max_wait_s=300)
    monkeypatch.setattr(service, "gate", gate)
    ids = corpus_ids(gateway)
    quiet, noisy = await new_client(gateway), await new_client(gateway)
    cache = await quiet.create(ids[:512])
    own = await noisy.create(ids[:300])

    held = Gate(service.engine)  # prefills (save plans) wait until opened
    monkeypatch.setattr(service.engine, "generate", held)
    running = asyncio.create_task(noisy.create(ids[1000:1512]))
    await asyncio.wait_for(held.entered.wait(), 120)
    queued = asyncio.create_task(noisy.create(ids[2000:2512]))
    for _ in range(6000):  # the second create reaches the gate after its own DB work
        if gate.queued(noisy.tenant_id):
            break
        await asyncio.sleep(0.01)
    assert gate.running_for(noisy.tenant_id) == 1

    # the noisy tenant's next requests are refused at once, on every engine route
    completion = {"model": "tiny", "prompt": ids[:20], "max_tokens": 2}
    refused = [
        await noisy.request("POST", "/v1/cache/create", json={"token_ids": ids[3000:3512]}),
        await noisy.attach(cache_id=own["id"]),
        await noisy.attach(cache_id=own["id"], stream=True),
        await noisy.request("POST", "/v1/completions", json=completion),
        await noisy.request("POST", "/v1/completions", json={**completion, "stream": True}),
    ]
    for r in refused:
        assert r.status_code == 429 and r.json()["error"]["type"] == "engine_busy", r.text
        assert r.headers["Retry-After"]
    # refused on arrival, before any of its work: the refused create left no cache behind
    r = await noisy.request("GET", "/v1/caches", params={"status": "failed"})
    assert r.status_code == 200 and r.json()["data"] == [], r.text
    assert gate.admitted(noisy.tenant_id) == 2  # the running create and the queued one

    # the quiet tenant is admitted at once, ahead of the noisy tenant's queue
    r = await quiet.attach(cache_id=cache["id"], token_ids=ids[512:520])
    assert r.status_code == 200, r.text
    assert gate.queued(noisy.tenant_id) == 1 and not running.done()

    held.opened.set()
    assert (await running)["status"] == "ready" and (await queued)["status"] == "ready"
    assert gate.running == 0 and gate.queued() == 0
