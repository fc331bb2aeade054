"""The cache lifecycle on the real engine: list, get, patch, delete, async create, quotas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kvtest.caches import Gate, corpus_ids, new_client
from sqlalchemy import update

from kvaas.db.base import utcnow
from kvaas.db.models import Cache
from kvaas.engine import EngineError
from kvaas.services.caches import SHUTDOWN_REASON

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

UNKNOWN = "cache_000000000000000000000000"


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def _set(gateway, model, key, **values) -> None:  # type: ignore[no-untyped-def]
    async with gateway.app.state.db.session() as s:
        await s.execute(update(model).where(model.id == key).values(**values))
        await s.commit()


async def test_get_and_not_found(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    c = await cl.create(corpus_ids(gateway)[:300], name="doc", metadata={"team": "a"})
    r = await cl.get(c["id"])
    assert r.status_code == 200, r.text
    got = r.json()
    for k in ("id", "status", "version", "tokens", "stored_tokens", "stored_bytes", "expires_at"):
        assert got[k] == c[k]
    assert got["name"] == "doc" and got["metadata"] == {"team": "a"} and got["tags"] == []
    assert got["refresh_on_hit"] is False and got["ttl_seconds"] == 3600
    assert got["progress"] == {"tokens_done": 300, "tokens_total": 300}
    assert got["usage"] is None

    other = await new_client(gateway)
    r_other = await other.get(c["id"])
    r_unknown = await cl.get(UNKNOWN)
    assert r_other.status_code == r_unknown.status_code == 404
    assert r_other.json()["error"]["message"].replace(c["id"], "X") == r_unknown.json()["error"][
        "message"
    ].replace(UNKNOWN, "X")
    assert (await cl.request("GET", "/v1/caches/" + "x" * 65)).status_code == 422
    r = await gateway.client.get(f"/v1/caches/{c['id']}")
    assert r.status_code == 401

    await _set(gateway, Cache, c["id"], expires_at=utcnow() - timedelta(seconds=1))
    assert (await cl.get(c["id"])).status_code == 404
    assert (await cl.request("GET", "/v1/caches")).json()["data"] == []


async def test_list_filters_and_cursor_pagination(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)
    made = []
    for i in range(5):
        made.append(
            await cl.create(
                ids[i * 300 : i * 300 + 256],
                name="even" if i % 2 == 0 else "odd",
                metadata={"i": str(i), "team": "x" if i < 3 else "y"},
                storage_class="cold",
            )
        )
    other = await new_client(gateway)
    await other.create(ids[:256], name="even")
    newest_first = [c["id"] for c in reversed(made)]

    async def walk(**params):  # type: ignore[no-untyped-def]
        out, cursor, pages = [], None, 0
        while True:
            q = dict(params)
            if cursor:
                q["after"] = cursor
            r = await cl.request("GET", "/v1/caches", params=q)
            assert r.status_code == 200, r.text
            page = r.json()
            assert page["object"] == "list"
            out += [c["id"] for c in page["data"]]
            pages += 1
            assert page["has_more"] == (page["next_cursor"] is not None)
            if not page["has_more"]:
                return out, pages
            cursor = page["next_cursor"]

    assert await walk() == (newest_first, 1)
    assert await walk(limit=2) == (newest_first, 3)
    assert await walk(limit=2, order="asc") == (newest_first[::-1], 3)
    assert await walk(limit=5) == (newest_first, 1)
    assert (await walk(name="even"))[0] == [made[i]["id"] for i in (4, 2, 0)]
    assert (await walk(name="even", limit=1))[0] == [made[i]["id"] for i in (4, 2, 0)]
    assert (await walk(**{"metadata[team]": "x"}))[0] == [made[i]["id"] for i in (2, 1, 0)]
    assert (await walk(**{"metadata[team]": "x", "metadata[i]": "1"}))[0] == [made[1]["id"]]
    assert (await walk(metadata_key="team", metadata_value="y"))[0] == [
        made[i]["id"] for i in (4, 3)
    ]
    assert (await walk(model="tiny", status="ready"))[0] == newest_first
    assert (await walk(model="other"))[0] == []
    assert (await walk(status="pending"))[0] == []
    r = await cl.request("PUT", "/v1/tags/lst", json={"cache_id": made[3]["id"]})
    assert r.status_code == 200, r.text
    assert (await walk(tag="lst"))[0] == [made[3]["id"]]
    assert (await walk(tag="nope"))[0] == []
    r = await cl.request("GET", "/v1/caches", params={"limit": 1})
    assert (
        r.json()["data"][0]["tags"] == [] and r.json()["data"][0]["progress"]["tokens_done"] == 256
    )

    # deleted caches leave the list
    assert (await cl.request("DELETE", f"/v1/caches/{made[4]['id']}")).status_code == 200
    assert (await walk())[0] == newest_first[1:]

    for params in [
        {"limit": 0},
        {"limit": 101},
        {"order": "up"},
        {"status": "deleted"},
        {"after": "not-a-cursor"},
        {"after": "WzFd"},  # valid base64 JSON, wrong shape
        {"metadata_key": "team"},
    ]:
        r = await cl.request("GET", "/v1/caches", params=params)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["error"]["type"] == "validation_error"


async def test_patch(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[2000:2600]
    c = await cl.create(ids, storage_class="cold", compression="int8")
    cid = c["id"]
    url = f"/v1/caches/{cid}"

    r = await cl.request("PATCH", url, json={"name": "renamed", "metadata": {"k": "v"}})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "renamed" and r.json()["metadata"] == {"k": "v"}
    r = await cl.request("PATCH", url, json={"name": None})
    assert r.json()["name"] is None and r.json()["metadata"] == {"k": "v"}

    before = datetime.now(UTC)
    r = await cl.request("PATCH", url, json={"ttl_seconds": 7200, "refresh_on_hit": True})
    body = r.json()
    assert body["ttl_seconds"] == 7200 and body["refresh_on_hit"] is True
    assert abs((_when(body["expires_at"]) - before).total_seconds() - 7200) < 10
    at = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    r = await cl.request("PATCH", url, json={"expires_at": at.isoformat()})
    assert r.status_code == 200, r.text
    assert _when(r.json()["expires_at"]) == at
    assert abs(r.json()["ttl_seconds"] - 2 * 86400) <= 2

    # storage class: the chunks move from disk to Redis
    keys = await cl.keys(ids, "int8")
    store = cl.service.store
    assert all(await store.tier("disk").exists_many(keys))
    assert not any(await store.tier("redis").exists_many(keys))
    r = await cl.request("PATCH", url, json={"storage_class": "hot"})
    assert r.status_code == 200, r.text
    assert r.json()["storage_class"] == "hot"
    assert all(await store.tier("redis").exists_many(keys))
    assert not any(await store.tier("disk").exists_many(keys))
    manifest = await store.get_manifest(await cl.slot(), cid, 1)
    assert manifest.storage_class == "hot"
    r = await cl.attach(cache_id=cid, token_ids=[4, 5])
    assert r.status_code == 200 and r.json()["cache"]["hit"] is True

    for body, status in [
        ({"ttl_seconds": 10}, 400),
        ({"ttl_seconds": 10**9}, 400),
        ({"expires_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}, 400),
        ({"ttl_seconds": 600, "expires_at": at.isoformat()}, 422),
        ({"expires_at": "2030-01-01T00:00:00"}, 422),  # no time zone
        ({"storage_class": "warm"}, 422),
        ({"storage_class": None}, 422),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 422),
        ({"tokens": 5}, 422),
        ({"refresh_on_hit": "maybe"}, 422),
    ]:
        r = await cl.request("PATCH", url, json=body)
        assert r.status_code == status, (body, r.text)
    assert (
        await cl.request("PATCH", "/v1/caches/" + UNKNOWN, json={"name": "x"})
    ).status_code == 404
    other = await new_client(gateway)
    assert (await other.request("PATCH", url, json={"name": "x"})).status_code == 404
    assert (await cl.get(cid)).json()["name"] is None  # nothing changed


async def test_patch_storage_class_conflicts_while_pending(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    gate = Gate(gateway.app.state.engine)
    monkeypatch.setattr(gateway.app.state.engine, "generate", gate)
    c = await cl.create(corpus_ids(gateway)[:300], wait=False, status=202)
    await gate.entered.wait()
    r = await cl.request("PATCH", f"/v1/caches/{c['id']}", json={"storage_class": "cold"})
    assert r.status_code == 409, r.text
    r = await cl.request("PATCH", f"/v1/caches/{c['id']}", json={"name": "fine"})
    assert r.status_code == 200 and r.json()["status"] == "pending"
    gate.opened.set()
    assert (await cl.wait_status(c["id"]))["name"] == "fine"


async def test_refresh_on_hit(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[3000:3300]
    plain = await cl.create(ids, ttl_seconds=120)
    refreshed = await cl.create(ids, ttl_seconds=120, refresh_on_hit=True)
    assert refreshed["refresh_on_hit"] is True
    soon = utcnow() + timedelta(seconds=70)
    for c in (plain, refreshed):
        await _set(gateway, Cache, c["id"], expires_at=soon)
        r = await cl.attach(cache_id=c["id"], token_ids=[3])
        assert r.status_code == 200, r.text
    assert _when((await cl.get(plain["id"])).json()["expires_at"]) == soon
    pushed = _when((await cl.get(refreshed["id"])).json()["expires_at"])
    assert abs((pushed - utcnow()).total_seconds() - 120) < 10


async def test_delete_releases_unshared_chunks(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[4000:]
    shared = ids[:512]
    a = await cl.create(shared + ids[512:1100], storage_class="cold")  # 4 full, 1 partial
    b = await cl.create(shared, storage_class="cold")  # a's first 2 chunks: the same keys
    keys_a = await cl.keys(shared + ids[512:1100], "int4")
    store = cl.service.store
    slot = await cl.slot()
    assert (
        await cl.request("PUT", "/v1/tags/del-me", json={"cache_id": a["id"]})
    ).status_code == 200

    r = await cl.request("DELETE", f"/v1/caches/{a['id']}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "deleted" and r.json()["id"] == a["id"]
    assert await store.list_versions(slot, a["id"]) == []
    await store.collect_garbage(grace_s=0)
    assert await store.exists_many(keys_a) == [True, True, False, False, False]  # b uses 2
    assert (await cl.get(a["id"])).status_code == 404
    assert (await cl.request("DELETE", f"/v1/caches/{a['id']}")).status_code == 404
    assert (await cl.request("GET", "/v1/tags/del-me")).status_code == 404
    assert (await cl.attach(cache_id=a["id"])).status_code == 404
    r = await cl.attach(cache_id=b["id"], token_ids=[9])
    assert r.json()["cache"]["hit"] is True

    other = await new_client(gateway)
    assert (await other.request("DELETE", f"/v1/caches/{b['id']}")).status_code == 404
    assert (await cl.request("DELETE", "/v1/caches/" + UNKNOWN)).status_code == 404
    assert (await cl.request("DELETE", f"/v1/caches/{b['id']}")).status_code == 200
    await store.collect_garbage(grace_s=0)
    assert not any(await store.exists_many(keys_a))


async def test_async_create_progress_and_ready(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[5000:6500]
    first = await cl.create(ids[:512])  # stores the first two chunks of `ids`
    gate = Gate(gateway.app.state.engine)
    monkeypatch.setattr(gateway.app.state.engine, "generate", gate)
    r = await cl.request("POST", "/v1/cache/create", json={"token_ids": ids, "wait": False})
    assert r.status_code == 202, r.text
    c = r.json()
    assert c["status"] == "pending" and c["usage"] is None
    # chunk-granular: the two chunks `first` stored already count
    assert c["progress"] == {"tokens_done": 512, "tokens_total": 1500}
    await gate.entered.wait()
    got = (await cl.get(c["id"])).json()
    assert got["status"] == "pending"
    assert got["progress"] == {"tokens_done": 512, "tokens_total": 1500}
    listed = (await cl.request("GET", "/v1/caches", params={"status": "pending"})).json()
    assert [x["id"] for x in listed["data"]] == [c["id"]]
    assert listed["data"][0]["progress"]["tokens_done"] == 512
    gate.opened.set()
    done = await cl.wait_status(c["id"])
    assert done["status"] == "ready" and done["stored_tokens"] == 1500
    assert done["progress"] == {"tokens_done": 1500, "tokens_total": 1500}
    assert cl.service.running_jobs == 0
    r = await cl.attach(cache_id=c["id"], token_ids=[1])
    assert r.json()["cache"]["hit"] is True
    assert first["status"] == "ready"


async def test_async_create_failure_and_shutdown(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[6500:7000]
    engine = gateway.app.state.engine
    service = cl.service
    slot = await cl.slot()

    async def broken(*_a, **_k):  # type: ignore[no-untyped-def]
        raise EngineError("the engine exploded")

    monkeypatch.setattr(engine, "generate", broken)
    c = await cl.create(ids, wait=False, status=202)
    failed = await cl.wait_status(c["id"])
    assert failed["status"] == "failed" and "exploded" in failed["failure_reason"]
    assert failed["progress"] is None
    assert await service.store.list_versions(slot, c["id"]) == []
    r = await cl.request("POST", "/v1/cache/create", json={"token_ids": ids})
    assert r.status_code == 503, r.text  # the waiting form reports the failure itself
    assert (await cl.attach(cache_id=c["id"])).status_code == 409  # failed, not ready

    # shutdown: a prefill still running is cancelled and its cache marked failed
    monkeypatch.undo()
    gate = Gate(engine)
    monkeypatch.setattr(engine, "generate", gate)
    c = await cl.create(ids, wait=False, status=202)
    await gate.entered.wait()
    assert service.running_jobs == 1
    await service.drain(grace_s=0.2)
    assert service.running_jobs == 0
    got = (await cl.get(c["id"])).json()
    assert got["status"] == "failed" and got["failure_reason"] == SHUTDOWN_REASON
    assert await service.store.list_versions(slot, c["id"]) == []

    # ... and one that finishes within the grace period is waited for
    gate.opened.set()
    c = await cl.create(ids, wait=False, status=202)
    await service.drain(grace_s=120)
    assert (await cl.get(c["id"])).json()["status"] == "ready"


async def test_deleting_a_pending_cache(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[7000:7600]
    gate = Gate(gateway.app.state.engine)
    monkeypatch.setattr(gateway.app.state.engine, "generate", gate)
    c = await cl.create(ids, wait=False, status=202)
    await gate.entered.wait()
    r = await cl.request("DELETE", f"/v1/caches/{c['id']}")
    assert r.status_code == 200 and r.json()["status"] == "deleted"
    gate.opened.set()
    await cl.service.drain(grace_s=120)  # waits for the prefill to finish
    store = cl.service.store
    assert await store.list_versions(await cl.slot(), c["id"]) == []  # the prefill released it
    await store.collect_garbage(grace_s=0)
    assert not any(await store.exists_many(await cl.keys(ids, "int4")))


async def test_quotas(gateway) -> None:  # type: ignore[no-untyped-def]
    ids = corpus_ids(gateway)[8000:]
    cl = await new_client(gateway, storage_quota_tokens=1000)
    a = await cl.create(ids[:600])
    r = await cl.request("POST", "/v1/cache/create", json={"token_ids": ids[:600]})
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert err["type"] == "quota_exceeded"
    assert (err["limit"], err["current"], err["maximum"], err["requested"]) == (
        "storage_tokens",
        600,
        1000,
        600,
    )
    # async creates are refused before they start, too
    r = await cl.request("POST", "/v1/cache/create", json={"token_ids": ids[:600], "wait": False})
    assert r.status_code == 402
    url = f"/v1/caches/{a['id']}/extend"
    r = await cl.request("POST", url, json={"token_ids": ids[600:1100]})
    assert r.status_code == 402 and r.json()["error"]["current"] == 600
    r = await cl.request("POST", url, json={"token_ids": ids[600:900]})
    assert r.status_code == 201 and r.json()["tokens"] == 900
    r = await cl.request("POST", "/v1/cache/create", json={"token_ids": ids[:256]})
    assert r.status_code == 402 and r.json()["error"]["current"] == 900  # the smallest cache
    assert (await cl.request("DELETE", f"/v1/caches/{a['id']}")).status_code == 200
    await cl.create(ids[:600])  # room again

    # bytes: int4 chunks of this model are 147,573 bytes stored (sealed), a partial one of
    # 88 tokens 52,085 and one of 44 tokens 26,101; the estimate is exact
    full, tail88, tail44 = 147_573, 52_085, 26_101
    cl = await new_client(gateway, storage_quota_bytes=2 * full + tail88 + 1000)
    c = await cl.create(ids[:600])
    assert c["stored_bytes"] == 2 * full + tail88
    r = await cl.request("POST", "/v1/cache/create", json={"token_ids": ids[:300]})
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert (err["limit"], err["current"], err["maximum"], err["requested"]) == (
        "storage_bytes",
        2 * full + tail88,
        2 * full + tail88 + 1000,
        full + tail44,
    )
    r = await cl.request("POST", "/v1/cache/create", json={"token_ids": ids[:200]})
    assert r.status_code == 400 and "at least 256" in r.json()["error"]["message"]  # no chunk
    r = await cl.request("POST", f"/v1/caches/{c['id']}/extend", json={"token_ids": ids[600:800]})
    assert r.status_code == 402  # a third chunk

    # number of live caches
    cl = await new_client(gateway, max_caches=2)
    for _ in range(2):
        await cl.create(ids[:256])
    r = await cl.request("POST", "/v1/cache/create", json={"token_ids": ids[:256]})
    assert r.status_code == 429, r.text
    assert "retry-after" not in r.headers
    err = r.json()["error"]
    assert err["type"] == "cache_limit_exceeded"
    assert (err["limit"], err["current"], err["maximum"]) == ("caches", 2, 2)
