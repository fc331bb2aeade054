"""Encryption at rest through the real engine: the chunks a create stores are sealed in Redis
and on disk (files 0600 in 0700 directories, under a generated 0600 master key), attach opens
them, and a sealed blob moved under another chunk key is never loaded: the engine recomputes
and answers exactly as a cold run."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from kvtest.caches import corpus_ids, new_client

from kvaas.engine import Sampling
from kvaas.store import DiskTier, RedisTier
from kvaas.store.crypto import MAGIC, MASTER_KEY_FILE

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_stored_chunks_are_sealed_and_private(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[9000:9600]
    await cl.create(ids, compression="int4", storage_class="cold")
    await cl.create(ids[:300], compression="none", storage_class="hot")
    store = cl.service.store
    disk, redis = store.tier("disk"), store.tier("redis")
    assert isinstance(disk, DiskTier) and isinstance(redis, RedisTier)
    stored = [
        *(await disk.get_many(await cl.keys(ids, "int4"))),
        *(await redis.get_many(await cl.keys(ids[:300], "none"))),
    ]
    assert len(stored) == 5  # 2 full and a partial chunk, a full and a partial one
    for b in stored:  # sealed, not codec containers
        assert b is not None and bytes(b)[:4] == MAGIC
    for k in await cl.keys(ids, "int4"):
        path = disk.path_of(k)
        assert mode(path) == 0o600
        assert mode(path.parent) == mode(path.parent.parent) == mode(disk.root) == 0o700
    key_file = gateway.settings.data_dir / MASTER_KEY_FILE  # embedded default: generated
    assert mode(key_file) == 0o600


async def test_blob_moved_under_another_key_is_recomputed(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[10000:10800]
    cache = await cl.create(ids, compression="none", storage_class="hot")
    keys = await cl.keys(ids, "none")
    redis = cl.service.store.tier("redis")
    assert len(keys) == 4 and all(await redis.exists_many(keys))  # 3 full, 1 partial
    # whoever can write to Redis puts chunk 2's sealed blob under chunk 1's key
    (moved,) = await redis.get_many(keys[2:3])
    name = redis.keys.chunk(keys[1])
    await redis.conn.run(lambda c: c.set(name, moved))
    extra = [10, 11, 12]
    ref = await gateway.app.state.engine.generate(
        ids + extra, Sampling(max_tokens=4, temperature=0.0)
    )
    r = await cl.attach(cache_id=cache["id"], token_ids=extra)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["token_ids"] == ref.token_ids  # never the moved chunk's KV
    assert body["cache"]["hit"] is False and body["cache"]["miss_reason"] == "load_failed"
    assert body["usage"]["cached_tokens"] < 768  # not the moved chunk, nor what follows it
    assert await redis.exists_many(keys) == [True, False, True, True]  # the worker removed it
