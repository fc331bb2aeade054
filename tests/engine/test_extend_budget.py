"""An extend is refused like a create once the tenant's monthly budget is spent
(``KVAAS_BUDGET_HARD_LIMIT``): ``402 budget_exceeded``, no version started."""

from __future__ import annotations

from kvtest.caches import corpus_ids, new_client


async def test_extend_checks_the_budget_hard_limit(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ids = corpus_ids(gateway)[9000:9600]
    cl = await new_client(gateway)
    c = await cl.create(ids[:300])
    r = await cl.request("PUT", "/v1/budget", json={"amount_minor": 0, "currency": "USD"})
    assert r.status_code == 200, r.text
    monkeypatch.setattr(gateway.app.state.cache_service.settings, "budget_hard_limit", True)
    r = await cl.request("POST", "/v1/cache/create", json={"token_ids": ids[:300]})
    assert r.status_code == 402 and r.json()["error"]["type"] == "budget_exceeded"
    r = await cl.request("POST", f"/v1/caches/{c['id']}/extend", json={"token_ids": ids[300:600]})
    assert r.status_code == 402, r.text
    assert r.json()["error"]["type"] == "budget_exceeded"
    r = await cl.request("GET", f"/v1/caches/{c['id']}/versions")
    assert [v["version"] for v in r.json()["data"]] == [1]
