"""A tensor-parallel engine (two CPU workers, each holding one of the tiny model's two KV
heads) behind the gateway, on a shared store: each rank stores its piece of every chunk under
its own shard key, and the gateway names every rank's key wherever it asks the store.

Checked through the API: a create completes (the gateway finds both ranks' pieces; looking for
the plain chunk keys, as before, it found none and failed the cache: "only 0 of 2 chunks
reached the store"); the manifest lists every shard key and no plain key; an attach is a full
hit whose greedy output is the cold run's; deleting the cache and collecting garbage removes
every rank's piece. Its own engine (two worker processes), started once for the module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kvtest.caches import corpus_ids, new_client
from kvtest.gateway import new_tenant, serving
from kvtest.services import PgSchema

from kvaas.services import outbox
from kvaas.store.keys import shard_keys

from .conftest import Gateway, engine_settings

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TP = 2


@pytest.fixture(scope="module")
async def tp_gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    schema = PgSchema()
    settings = engine_settings(
        tmp_path_factory.mktemp("kvaas-tp"),
        schema.url,
        engine_tensor_parallel_size=TP,
        engine_max_model_len=2048,
        engine_kv_cache_gib=0.5,
    )
    try:
        async with serving(settings, request_timeout_s=600) as (app, client):
            _t, key = await new_tenant(client, "tp")
            yield Gateway(app, client, settings, key, key)
    finally:
        schema.drop()


async def test_a_tensor_parallel_engine_stores_and_attaches_every_ranks_piece(
    tp_gateway: Gateway,
) -> None:
    cl = await new_client(tp_gateway)
    ids = corpus_ids(tp_gateway)[:520]  # two full chunks of 256 and a partial one
    cache = await cl.create(ids[:512])
    assert cache["status"] == "ready", cache
    store = cl.service.store
    plain = await cl.keys(ids[:512], cache["compression"])
    shards = shard_keys(plain, TP, 1)
    assert len(shards) == 2 * TP and not set(shards) & set(plain)
    manifest = await store.get_manifest(await cl.slot(), cache["id"], 1)
    assert manifest is not None and list(manifest.chunk_keys) == shards
    assert all(await store.exists_many(shards))
    assert not any(await store.exists_many(plain))

    r = await cl.attach(cache_id=cache["id"], token_ids=ids[512:520], require_hit=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cache"]["hit"] is True and body["usage"]["cached_tokens"] >= 512, body
    r = await cl.request(
        "POST",
        "/v1/completions",
        json={"model": "tiny", "prompt": ids[:520], "max_tokens": 4, "temperature": 0.0},
    )
    assert r.status_code == 200, r.text
    assert body["choices"][0]["text"] == r.json()["choices"][0]["text"]

    r = await cl.request("DELETE", f"/v1/caches/{cache['id']}")
    assert r.status_code in (200, 204), r.text
    await outbox.drain(tp_gateway.app.state.db, store)
    for _ in range(50):
        await store.collect_garbage(grace_s=0.0)
        if not any(await store.exists_many(shards)):
            break
        await asyncio.sleep(0.1)
    assert not any(await store.exists_many(shards))


def test_the_node_command_and_route_name_the_world(tmp_path: Path) -> None:
    """A node started with the printed command reports its world to the gateway's probe."""
    from kvaas.engine.node import node_world
    from kvaas.engine.node_command import serve_command
    from kvaas.engine.options import EngineOptions

    both = EngineOptions(tensor_parallel_size=2, pipeline_parallel_size=3)
    argv = serve_command("/models/tiny", "tiny", {}, port=8100, options=both).argv
    assert node_world(argv) == (2, 3)
    assert node_world(serve_command("/models/tiny", "tiny", {}, port=8100).argv) == (1, 1)


def test_cpu_workers_are_bound_only_while_the_engine_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each of several CPU workers gets its own CPUs while its engine starts; afterwards the
    variable is gone again (a later one-worker engine, e.g. a restart of the session's, must
    not inherit a two-rank binding), and an operator's own binding is left alone."""
    import os

    from kvaas.engine.inprocess import CPU_BIND_ENV, cpu_worker_binding

    monkeypatch.delenv(CPU_BIND_ENV, raising=False)
    cpus = sorted(os.sched_getaffinity(0))
    with cpu_worker_binding(2):
        ranks = os.environ[CPU_BIND_ENV].split("|")
        assert len(ranks) == 2 and not set(ranks[0].split(",")) & set(ranks[1].split(","))
        assert {int(c) for r in ranks for c in r.split(",")} <= set(cpus)
    assert CPU_BIND_ENV not in os.environ
    with cpu_worker_binding(1):
        assert CPU_BIND_ENV not in os.environ
    monkeypatch.setenv(CPU_BIND_ENV, "0")
    with cpu_worker_binding(2):
        assert os.environ[CPU_BIND_ENV] == "0"
