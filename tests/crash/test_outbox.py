"""Store releases survive crashes and store errors: the intent is committed with the status
change (the outbox), drained until the store confirms, and the reconciler finds manifests no
live version owns (SQLite and PostgreSQL, real embedded store)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from kvaas.db.models import StoreRelease, Tenant
from kvaas.services import outbox
from kvaas.services.caches import CacheService
from kvaas.services.reconcile import Reconciler, reconcile_all
from kvaas.store.crypto import MasterKeys, namespace_secret_context, wrap_secret
from kvaas.store.errors import StoreError

from .conftest import World, _world


@pytest.fixture(params=["embedded", "redis"])
async def any_world(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> AsyncIterator[World]:
    """The service on each kind of store: the embedded one (SQLite reference index) and one
    with a Redis tier and the Redis reference index (a private prefix, deleted afterwards)."""
    prefix = None if request.param == "embedded" else f"kvcrash-{secrets.token_hex(4)}"
    async with _world(database_url, tmp_path, prefix) as w:
        yield w


def _break(w: World, method: str, error: BaseException) -> None:
    """``store.<method>`` raises ``error`` (once): the process dies there (cancellation), or
    the store fails there."""
    real = getattr(w.store, method)
    state = {"armed": True}

    async def broken(*args: Any, **kwargs: Any) -> Any:
        if state["armed"]:
            state["armed"] = False
            raise error
        return await real(*args, **kwargs)

    setattr(w.store, method, broken)


async def _rows(w: World) -> list[StoreRelease]:
    async with w.db.session() as s:
        return list((await s.execute(select(StoreRelease))).scalars())


async def _reconcile(w: World) -> int:
    return await reconcile_all(w.db, w.store, w.service._slot)


@pytest.mark.parametrize("status", ["ready", "pending"])
async def test_a_release_cut_off_by_a_crash_is_carried_out_after_restart(
    any_world: World, status: str
) -> None:
    """The delete commits, then the process dies before the store released anything (a
    pending cache deleted while its gateway dies included): the release is in the outbox, and
    the next gateway's drain releases every manifest; nothing is left for the reconciler."""
    w = any_world
    cache = await w.seed({1: status}, status=status)
    _break(w, "list_versions", asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        async with w.db.session() as s:
            await w.service.delete(s, w.tenant, cache.id)
    assert (await w.row(cache.id)).status == "deleted"
    assert await w.stored_versions(cache.id) == [1]  # still held: the process died
    assert [(r.cache_id, r.version, r.reason) for r in await _rows(w)] == [
        (cache.id, None, "deleted")
    ]
    # a new gateway process: its maintenance drains the outbox
    restarted = CacheService(w.service.settings, w.store, None, w.db)
    result = await outbox.drain(restarted.db, restarted.store)
    assert (result.released, result.depth) == (1, 0)
    assert await w.stored_versions(cache.id) == []
    assert await _reconcile(w) == 0


async def test_a_store_error_leaves_the_release_for_a_retry_with_back_off(any_world: World) -> None:
    """A version delete whose release meets a store error: the row stays (attempts 1, a
    back-off), the version's manifest is held until a later drain succeeds."""
    w = any_world
    cache = await w.seed({1: "ready", 2: "ready"})
    _break(w, "delete_manifest", StoreError("redis: connection refused"))
    async with w.db.session() as s:
        await w.service.delete_version(s, w.tenant, cache.id, 1)
    assert await w.stored_versions(cache.id) == [1, 2]
    (row,) = await _rows(w)
    assert (row.version, row.attempts) == (1, 0)
    # the store is still down at the first drain
    _break(w, "delete_manifest", StoreError("redis: connection refused"))
    result = await outbox.drain(w.db, w.store)
    assert (result.released, result.retried, result.depth) == (0, 1, 1)
    (row,) = await _rows(w)
    assert row.attempts == 1 and row.last_error and "connection refused" in row.last_error
    assert row.next_attempt_at > row.created_at
    assert (await outbox.drain(w.db, w.store)).released == 0  # not due yet
    async with w.db.session() as s:
        await s.execute(update(StoreRelease).values(next_attempt_at=row.created_at))
        await s.commit()
    assert (await outbox.drain(w.db, w.store)).released == 1
    assert await w.stored_versions(cache.id) == [2]
    assert await _rows(w) == []
    assert outbox.backoff(1) == timedelta(seconds=1)
    assert outbox.backoff(5) == timedelta(seconds=16)
    assert outbox.backoff(40) == outbox.MAX_BACKOFF


async def test_reconciler_finds_manifests_no_live_version_owns(any_world: World) -> None:
    """Manifests left behind (a failed version's, a deleted cache's, written by a prefill
    after its cache's release) are found once, queued and released; the live and pending
    versions' manifests are left; a second cycle finds nothing."""
    w = any_world
    live = await w.seed({1: "ready", 2: "failed", 3: "pending"})
    gone = await w.seed({1: "ready"})
    async with w.db.session() as s:
        await w.service.delete(s, w.tenant, gone.id)
    assert await w.stored_versions(gone.id) == []
    # left behind: the failed version's manifest, and one a dead prefill wrote after the delete
    await w.store.put_manifest(w.job(live, 2).manifest())
    await w.store.put_manifest(w.job(gone, 1).manifest())
    assert await _reconcile(w) == 2
    assert await _reconcile(w) == 0  # queued already: not queued twice
    assert (await outbox.drain(w.db, w.store)).released == 2
    assert await w.stored_versions(live.id) == [1, 3]
    assert await w.stored_versions(gone.id) == []
    assert await _reconcile(w) == 0


async def test_a_tenant_whose_keys_this_gateway_lacks_does_not_stop_the_reconciler(
    any_world: World,
) -> None:
    """A tenant whose namespace secret is wrapped under a master key this gateway does not
    hold (another key id: a shared database, a rotation half done) has its caches skipped with
    a warning; every other tenant's orphans are still found in the same pass."""
    w = any_world
    async with w.db.session() as s:
        stranger = Tenant(name="elsewhere")
        s.add(stranger)
        await s.flush()
        other = MasterKeys("elsewhere-k1", {"elsewhere-k1": secrets.token_bytes(32)})
        stranger.namespace_secret = wrap_secret(
            other, secrets.token_bytes(32), namespace_secret_context(stranger.id)
        )
        await s.commit()
    await w.seed({1: "ready"}, tenant=stranger)
    live = await w.seed({1: "ready", 2: "failed"})
    await w.store.put_manifest(w.job(live, 2).manifest())
    r = Reconciler()
    found = 0
    while True:
        found += await r.step(w.db, w.store, w.service.slot_of, batch=500)
        if r.wrapped:
            break
    assert found == 1 and r.found == [(live.id, 2)]
    assert r.skipped == {stranger.id}
