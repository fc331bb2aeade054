"""Tags on the real engine: create, re-point atomically, list, attach by tag, delete."""

from __future__ import annotations

import pytest
from kvtest.caches import corpus_ids, new_client

from kvaas.engine import EngineError

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

UNKNOWN = "cache_000000000000000000000000"


async def test_tag_lifecycle_and_attach_by_tag(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[11000:]
    a = await cl.create(ids[:600])
    b = await cl.create(ids[600:1200])

    r = await cl.request("PUT", "/v1/tags/contract.v1_latest-2", json={"cache_id": a["id"]})
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["object"] == "tag" and t["name"] == "contract.v1_latest-2"
    assert t["cache_id"] == a["id"]
    created = t["created_at"]
    r = await cl.request("GET", "/v1/tags/contract.v1_latest-2")
    assert r.status_code == 200 and r.json() == t
    assert (await cl.get(a["id"])).json()["tags"] == ["contract.v1_latest-2"]

    r = await cl.attach(tag="contract.v1_latest-2", token_ids=[7, 8])
    assert r.status_code == 200, r.text
    assert r.json()["cache"]["id"] == a["id"] and r.json()["cache"]["hit"] is True

    # re-point: one statement, the tag keeps its creation time
    r = await cl.request("PUT", "/v1/tags/contract.v1_latest-2", json={"cache_id": b["id"]})
    assert r.status_code == 200, r.text
    assert r.json()["cache_id"] == b["id"] and r.json()["created_at"] == created
    assert r.json()["updated_at"] >= created
    assert (await cl.get(a["id"])).json()["tags"] == []
    assert (await cl.get(b["id"])).json()["tags"] == ["contract.v1_latest-2"]
    r = await cl.attach(tag="contract.v1_latest-2", token_ids=[7, 8])
    assert r.json()["cache"]["id"] == b["id"]

    # attach by tag and version
    r = await cl.request("POST", f"/v1/caches/{b['id']}/extend", json={"token_ids": ids[1200:1500]})
    assert r.status_code == 201, r.text
    r = await cl.attach(tag="contract.v1_latest-2", version=1, token_ids=[1])
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 601
    r = await cl.attach(tag="contract.v1_latest-2", token_ids=[1])
    assert r.json()["usage"]["prompt_tokens"] == 901

    # listing, with cursor pagination by name
    for name in ("b-tag", "a-tag"):
        r = await cl.request("PUT", f"/v1/tags/{name}", json={"cache_id": a["id"]})
        assert r.status_code == 200
    names, cursor = [], None
    while True:
        params = {"limit": 2, **({"after": cursor} if cursor else {})}
        page = (await cl.request("GET", "/v1/tags", params=params)).json()
        names += [x["name"] for x in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert names == ["a-tag", "b-tag", "contract.v1_latest-2"]
    assert (await cl.get(a["id"])).json()["tags"] == ["a-tag", "b-tag"]

    # delete
    r = await cl.request("DELETE", "/v1/tags/b-tag")
    assert r.status_code == 200 and r.json() == {"object": "tag", "name": "b-tag", "deleted": True}
    assert (await cl.request("GET", "/v1/tags/b-tag")).status_code == 404
    assert (await cl.request("DELETE", "/v1/tags/b-tag")).status_code == 404
    assert (await cl.attach(tag="b-tag")).status_code == 404
    # deleting the cache takes its tags with it
    assert (await cl.request("DELETE", f"/v1/caches/{a['id']}")).status_code == 200
    assert (await cl.request("GET", "/v1/tags/a-tag")).status_code == 404
    page = (await cl.request("GET", "/v1/tags")).json()
    assert [x["name"] for x in page["data"]] == ["contract.v1_latest-2"]


async def test_tags_are_per_tenant(gateway) -> None:  # type: ignore[no-untyped-def]
    one, two = await new_client(gateway), await new_client(gateway)
    ids = corpus_ids(gateway)[12000:12300]
    c1, c2 = await one.create(ids), await two.create(ids)
    # another tenant's cache is as unknown as a missing one
    r_other = await one.request("PUT", "/v1/tags/shared", json={"cache_id": c2["id"]})
    r_unknown = await one.request("PUT", "/v1/tags/shared", json={"cache_id": UNKNOWN})
    assert r_other.status_code == r_unknown.status_code == 404
    assert r_other.json()["error"]["message"].replace(c2["id"], "X") == r_unknown.json()["error"][
        "message"
    ].replace(UNKNOWN, "X")
    # the same name in two tenants: two tags
    assert (
        await one.request("PUT", "/v1/tags/shared", json={"cache_id": c1["id"]})
    ).status_code == 200
    assert (
        await two.request("PUT", "/v1/tags/shared", json={"cache_id": c2["id"]})
    ).status_code == 200
    assert (await one.request("GET", "/v1/tags/shared")).json()["cache_id"] == c1["id"]
    assert (await two.request("GET", "/v1/tags/shared")).json()["cache_id"] == c2["id"]
    assert (await one.attach(tag="shared")).json()["cache"]["id"] == c1["id"]
    assert (await two.request("DELETE", "/v1/tags/shared")).status_code == 200
    assert (await one.request("GET", "/v1/tags/shared")).status_code == 200
    assert (await two.request("GET", "/v1/tags/shared")).status_code == 404
    assert (await one.request("GET", "/v1/caches", params={"tag": "shared"})).json()["data"][0][
        "id"
    ] == c1["id"]


async def test_tag_validation_and_conflicts(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[12500:12800]
    c = await cl.create(ids)
    for name in ("has space", "x" * 65, "ümlaut", "a:b"):
        r = await cl.request("PUT", f"/v1/tags/{name}", json={"cache_id": c["id"]})
        assert r.status_code == 422, (name, r.text)
        assert r.json()["error"]["param"] == "tag"
        assert (await cl.request("GET", f"/v1/tags/{name}")).status_code == 422
    for body in ({}, {"cache_id": c["id"], "extra": 1}, {"cache_id": 5}):
        r = await cl.request("PUT", "/v1/tags/ok", json=body)
        assert r.status_code == 422, (body, r.text)
    # attach takes exactly one of cache_id and tag
    for body in ({"cache_id": c["id"], "tag": "ok"}, {}, {"tag": "bad tag"}):
        r = await cl.attach(**body)
        assert r.status_code == 422, (body, r.text)
    assert (await cl.attach(tag="never-made")).status_code == 404
    assert (await cl.request("GET", "/v1/tags/never-made")).status_code == 404
    assert (await cl.request("DELETE", "/v1/tags/never-made")).status_code == 404
    assert (await cl.request("GET", "/v1/tags")).status_code == 200
    assert (await cl.request("GET", "/v1/tags", params={"limit": 0})).status_code == 422
    assert (await cl.request("GET", "/v1/tags", params={"after": "%%%"})).status_code == 422
    assert (await gateway.client.get("/v1/tags")).status_code == 401

    # a failed cache cannot be tagged (409)
    async def broken(*_a, **_k):  # type: ignore[no-untyped-def]
        raise EngineError("no")

    monkeypatch.setattr(gateway.app.state.engine, "generate", broken)
    failed = await cl.create(ids, wait=False, status=202)
    assert (await cl.wait_status(failed["id"]))["status"] == "failed"
    r = await cl.request("PUT", "/v1/tags/ok", json={"cache_id": failed["id"]})
    assert r.status_code == 409, r.text
