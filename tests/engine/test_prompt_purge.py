"""Retired prompts are purged: a deleted or expired cache, a deleted version and a failed
prefill keep their token counts and ``prefix_sha256`` (billing, audit) but not the token ids
that reproduce the prompt."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import numpy as np
import pytest
from kvtest.caches import corpus_ids, new_client
from sqlalchemy import select, update

from kvaas.db.base import utcnow
from kvaas.db.models import Cache, CacheVersion
from kvaas.engine import EngineError

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


async def _rows(gateway, cache_id: str) -> tuple[Cache, list[CacheVersion]]:  # type: ignore[no-untyped-def]
    async with gateway.app.state.db.session() as s:
        cache = await s.get(Cache, cache_id)
        assert cache is not None
        versions = (
            await s.execute(
                select(CacheVersion)
                .where(CacheVersion.cache_id == cache_id)
                .order_by(CacheVersion.version)
            )
        ).scalars()
        return cache, list(versions)


def _sha(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


async def test_deleted_version_and_cache_keep_counts_not_tokens(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)
    base, more = ids[9000:9300], ids[9300:9600]
    c = await cl.create(base, storage_class="cold")
    r = await cl.request("POST", f"/v1/caches/{c['id']}/extend", json={"token_ids": more})
    assert r.status_code == 201, r.text

    r = await cl.request("DELETE", f"/v1/caches/{c['id']}/versions/1")
    assert r.status_code == 200, r.text
    cache, (v1, v2) = await _rows(gateway, c["id"])
    assert v1.status == "deleted" and v1.token_ids == b""
    assert v1.tokens == 300 and v1.prefix_sha256 == _sha(base)
    assert v2.status == "ready" and len(v2.token_ids) == 4 * 600  # the live version keeps them
    assert cache.token_ids == v2.token_ids

    r = await cl.request("DELETE", f"/v1/caches/{c['id']}")
    assert r.status_code == 200, r.text
    cache, versions = await _rows(gateway, c["id"])
    assert cache.status == "deleted" and cache.token_ids == b""
    assert cache.tokens == 600 and cache.prefix_sha256 == _sha(base + more)
    assert [v.token_ids for v in versions] == [b"", b""]
    assert [v.tokens for v in versions] == [300, 600]


async def test_expired_cache_is_purged_by_the_sweep(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    c = await cl.create(corpus_ids(gateway)[9700:9960], storage_class="cold")
    async with gateway.app.state.db.session() as s:
        await s.execute(
            update(Cache)
            .where(Cache.id == c["id"])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await s.commit()
    async with gateway.app.state.db.session() as s:
        assert await cl.service.sweep(s) >= 1
    cache, (v1,) = await _rows(gateway, c["id"])
    assert cache.status == "expired" and cache.token_ids == b"" and v1.token_ids == b""
    assert cache.tokens == v1.tokens == 260


async def test_failed_prefill_is_purged(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)[10000:10300]

    async def broken(*_a, **_k):  # type: ignore[no-untyped-def]
        raise EngineError("the engine failed")

    monkeypatch.setattr(gateway.app.state.engine, "generate", broken)
    c = await cl.create(ids, wait=False, status=202)
    assert (await cl.wait_status(c["id"]))["status"] == "failed"
    cache, (v1,) = await _rows(gateway, c["id"])
    assert cache.token_ids == b"" and v1.token_ids == b"" and v1.status == "failed"
    assert cache.tokens == v1.tokens == 300 and cache.prefix_sha256 == _sha(ids)
