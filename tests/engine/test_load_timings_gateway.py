"""The connector's per-stage load times reach the gateway's ``/metrics``: an attach that loads
its cache from the store adds one observation of every stage it went through."""

from __future__ import annotations

import pytest
from kvtest.caches import corpus_ids, load_stage_count, new_client

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


async def test_an_attach_records_its_load_stages_in_the_gateway(gateway) -> None:  # type: ignore[no-untyped-def]
    client = await new_client(gateway)
    ids = corpus_ids(gateway)
    cache = await client.create(ids[4000:4600])
    before = {s: await load_stage_count(client.http, s) for s in ("load", "decode", "copy")}
    r = await client.attach(cache_id=cache["id"], token_ids=ids[5000:5010])
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["cached_tokens"] >= 512  # loaded from the store, not computed
    for stage, n in before.items():
        assert await load_stage_count(client.http, stage) == n + 1, stage
