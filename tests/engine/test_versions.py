"""Cache versions on the real engine: extend reuses the parent's chunks (loaded, not computed;
never written again), versions are attached, listed and deleted independently."""

from __future__ import annotations

import pytest
from kvtest.caches import Gate, corpus_ids, new_client

from kvaas.engine import Sampling

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

C = 256  # chunk tokens of the test gateway


async def test_extend_writes_only_new_chunks_and_attaches_exactly(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)
    base, more, extra = ids[7000:7600], ids[7600:8300], ids[8300:8310]
    v1 = await cl.create(base, compression="none", storage_class="hot")
    keys1 = await cl.keys(base, "none")  # two full chunks and the partial last one
    keys2 = await cl.keys(base + more, "none")  # five full chunks and the partial last one
    assert (len(keys1), len(keys2)) == (3, 6)
    assert keys2[:2] == keys1[:2]  # full chunks chain from the parent: the same chunks
    assert keys1[2] not in keys2  # the parent's partial chunk is not the child's third
    store = cl.service.store
    bytes_before = await cl.redis_bytes()
    assert bytes_before == sum(await store.sizes_many(keys1)) == v1["stored_bytes"]

    r = await cl.request("POST", f"/v1/caches/{v1['id']}/extend", json={"token_ids": more})
    assert r.status_code == 201, r.text
    v2 = r.json()
    assert v2["id"] == v1["id"] and v2["version"] == 2 and v2["status"] == "ready"
    assert v2["tokens"] == 1300 and v2["stored_tokens"] == 1300
    # the parent's two full chunks were loaded from the store, not computed
    assert v2["usage"]["prefill_tokens"] == 1300 - 2 * C
    # only the four new chunks were written (the tenant's Redis byte counter)
    new_sizes = await store.sizes_many(keys2[2:])
    written = await cl.redis_bytes() - bytes_before
    assert written == sum(new_sizes) and all(new_sizes)
    print(f"extend: {written} bytes written for 4 new chunks; parent holds {bytes_before}")
    # the cache's bytes count each chunk of its versions once; the version's, its own chunks
    all_sizes = await store.sizes_many(keys2)
    assert v2["stored_bytes"] == bytes_before + written
    assert await store.list_versions(await cl.slot(), v1["id"]) == [1, 2]

    r = await cl.request("GET", f"/v1/caches/{v1['id']}/versions")
    assert r.status_code == 200, r.text
    listed = r.json()
    assert listed["latest"] == 2
    assert [
        (v["version"], v["status"], v["tokens"], v["stored_tokens"]) for v in listed["data"]
    ] == [
        (1, "ready", 600, 600),
        (2, "ready", 1300, 1300),
    ]
    assert listed["data"][0]["stored_bytes"] == bytes_before
    assert listed["data"][1]["stored_bytes"] == sum(all_sizes)

    # attach: the latest version by default, exactly like a cold run of the whole prompt
    engine = gateway.app.state.engine
    ref2 = await engine.generate(base + more + extra, Sampling(max_tokens=6, temperature=0.0))
    r = await cl.attach(cache_id=v1["id"], token_ids=extra, max_tokens=6)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cache"]["hit"] is True
    bs = engine.block_size  # attach loads every stored token down to the engine's block
    assert body["usage"]["cached_tokens"] == 1300 // bs * bs
    assert body["choices"][0]["token_ids"] == ref2.token_ids
    # ... and an older version on request
    ref1 = await engine.generate(base + extra, Sampling(max_tokens=6, temperature=0.0))
    r = await cl.attach(cache_id=v1["id"], version=1, token_ids=extra, max_tokens=6)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        body["usage"]["prompt_tokens"] == 610 and body["usage"]["cached_tokens"] == 600 // bs * bs
    )
    assert body["choices"][0]["token_ids"] == ref1.token_ids


async def test_delete_versions(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[9000:]
    c = await cl.create(ids[:300], storage_class="cold")
    cid = c["id"]
    for n in (2, 3):
        r = await cl.request(
            "POST", f"/v1/caches/{cid}/extend", json={"token_ids": ids[300 * (n - 1) : 300 * n]}
        )
        assert r.status_code == 201, r.text
        assert r.json()["version"] == n
    store = cl.service.store
    slot = await cl.slot()
    keys1 = await cl.keys(ids[:300], "int4")  # a full chunk and a partial one
    keys2 = await cl.keys(ids[:600], "int4")
    keys3 = await cl.keys(ids[:900], "int4")
    assert (len(keys1), len(keys2), len(keys3)) == (2, 3, 4)

    # delete the oldest: its full chunk is shared with 2 and 3, so it stays; its partial
    # chunk is its own and goes
    r = await cl.request("DELETE", f"/v1/caches/{cid}/versions/1")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "deleted" and r.json()["version"] == 1
    assert await store.list_versions(slot, cid) == [2, 3]
    await store.collect_garbage(grace_s=0)
    assert all(await store.exists_many(keys3))
    assert await store.exists_many(keys1) == [True, False]
    r = await cl.attach(cache_id=cid, version=1)
    assert r.status_code == 404 and r.json()["error"]["param"] == "version"
    r = await cl.request("DELETE", f"/v1/caches/{cid}/versions/1")
    assert r.status_code == 404  # already deleted

    # delete the latest: the cache falls back to version 2; 3's own chunks are collectable
    r = await cl.request("DELETE", f"/v1/caches/{cid}/versions/3")
    assert r.status_code == 200, r.text
    got = (await cl.get(cid)).json()
    assert got["version"] == 2 and got["tokens"] == 600 and got["stored_tokens"] == 600
    assert got["stored_bytes"] == sum(await store.sizes_many(keys2))
    await store.collect_garbage(grace_s=0)
    assert await store.exists_many(keys3) == [True, True, False, False]
    assert all(await store.exists_many(keys2))
    r = await cl.attach(cache_id=cid, token_ids=[5])
    bs = gateway.app.state.engine.block_size
    assert r.status_code == 200 and r.json()["usage"]["cached_tokens"] == 600 // bs * bs

    # the last version cannot go: delete the cache instead
    r = await cl.request("DELETE", f"/v1/caches/{cid}/versions/2")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["type"] == "conflict_error"
    # numbers are never reused
    r = await cl.request("POST", f"/v1/caches/{cid}/extend", json={"prompt": " more"})
    assert r.status_code == 201 and r.json()["version"] == 4
    r = await cl.request("GET", f"/v1/caches/{cid}/versions")
    assert [(v["version"], v["status"]) for v in r.json()["data"]] == [
        (1, "deleted"),
        (2, "ready"),
        (3, "deleted"),
        (4, "ready"),
    ]

    # errors
    for method, url, status in [
        ("DELETE", f"/v1/caches/{cid}/versions/99", 404),
        ("DELETE", f"/v1/caches/{cid}/versions/0", 422),
        ("DELETE", f"/v1/caches/{cid}/versions/x", 422),
        ("DELETE", "/v1/caches/cache_000000000000000000000000/versions/1", 404),
        ("GET", "/v1/caches/cache_000000000000000000000000/versions", 404),
    ]:
        r = await cl.request(method, url)
        assert r.status_code == status, (url, r.text)
    other = await new_client(gateway)
    assert (await other.request("GET", f"/v1/caches/{cid}/versions")).status_code == 404
    assert (await other.request("DELETE", f"/v1/caches/{cid}/versions/2")).status_code == 404


async def test_extend_errors(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[10000:]
    c = await cl.create(ids[:300])
    url = f"/v1/caches/{c['id']}/extend"
    for body, status in [
        ({}, 422),
        ({"prompt": "a", "token_ids": [1]}, 422),
        ({"prompt": "a", "name": "x"}, 422),
        ({"token_ids": [10**9]}, 400),
        ({"token_ids": [7] * 4000}, 400),  # beyond the model's length
    ]:
        r = await cl.request("POST", url, json=body)
        assert r.status_code == status, (body, r.text)
    for key, cid in [(cl, "cache_000000000000000000000000"), (await new_client(gateway), c["id"])]:
        r = await key.request("POST", f"/v1/caches/{cid}/extend", json={"prompt": "x"})
        assert r.status_code == 404, r.text
    # a cache still being created cannot be extended (409), nor can a version being created
    # be deleted
    gate = Gate(gateway.app.state.engine)
    monkeypatch.setattr(gateway.app.state.engine, "generate", gate)
    pending = await cl.create(ids[:300], wait=False, status=202)
    await gate.entered.wait()
    r = await cl.request("POST", f"/v1/caches/{pending['id']}/extend", json={"prompt": "x"})
    assert r.status_code == 409, r.text
    r = await cl.request("DELETE", f"/v1/caches/{pending['id']}/versions/1")
    assert r.status_code == 409, r.text
    gate.opened.set()
    assert (await cl.wait_status(pending["id"]))["status"] == "ready"
