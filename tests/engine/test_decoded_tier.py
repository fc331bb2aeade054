"""The worker's pre-decoded tier in the real engine: once a cache has been attached, a later
attach of it is served from the decoded tier (the ``decoded`` stage in the gateway's
``kvaas_connector_load_stage_seconds``) and generates exactly what the first attach did."""

from __future__ import annotations

import asyncio

import pytest
from kvtest.caches import corpus_ids, load_stage_count, new_client

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


async def test_a_cache_attached_again_is_served_from_the_decoded_tier(gateway) -> None:  # type: ignore[no-untyped-def]
    assert gateway.settings.connector_decoded_bytes > 0  # the shared engine runs with it on
    client = await new_client(gateway)
    ids = corpus_ids(gateway)[7000:7800]
    cache = await client.create(ids, compression="int4")
    body = {"cache_id": cache["id"], "token_ids": [10, 11, 12], "max_tokens": 4}
    before = await load_stage_count(client.http, "decoded")
    first = await client.attach(**body)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["cached_tokens"] >= 512  # loaded from the store
    # nothing of it was decoded before
    assert await load_stage_count(client.http, "decoded") == before
    # promotion runs in the background after the load: a later attach finds the chunks
    for _ in range(20):
        await asyncio.sleep(0.1)
        again = await client.attach(**body)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["token_ids"] == first.json()["choices"][0]["token_ids"]
        assert again.json()["usage"]["cached_tokens"] == first.json()["usage"]["cached_tokens"]
        if await load_stage_count(client.http, "decoded") > before:
            break
    else:
        pytest.fail("no attach was served from the decoded tier")
