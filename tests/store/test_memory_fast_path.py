"""A prefix held entirely by the memory tier is read on the caller's thread.

A vLLM worker calls the store from its step thread through :class:`SyncTieredStore`, whose
operations run on a loop thread; on a busy machine waking that thread is what an attach from
the memory tier waits for. These tests hold the loop thread busy (a coroutine blocked on an
event the test controls) and show that a full memory hit still returns, verified, while a
prefix that needs another tier, or a memory blob that fails verification, takes the normal
path through the loop (and waits for it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvaas.store import StoreConfig, StoreError, SyncTieredStore, build_store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SyncTieredStore]:
    cfg = StoreConfig(memory_bytes=1 << 20, disk_dir=tmp_path, disk_bytes=1 << 24, redis_url=None)
    s = SyncTieredStore(build_store(cfg), timeout_s=2.0)
    s.open()
    yield s
    s.close()


class BusyLoop:
    """Holds the store's loop thread until released."""

    def __init__(self, store: SyncTieredStore) -> None:
        self.release = threading.Event()
        started = threading.Event()

        async def hold() -> None:
            started.set()
            self.release.wait(30)  # blocks the loop thread itself

        self.future = asyncio.run_coroutine_threadsafe(hold(), store._loop)
        assert started.wait(5)

    def __enter__(self) -> BusyLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.future.result(5)


def test_a_full_memory_hit_is_served_while_the_loop_is_busy(
    store: SyncTieredStore, tenant: Any
) -> None:
    sealer = tenant.sealer()
    items = tenant.chunks(3)
    store.put_chunks(items, "hot", sealer)
    keys = [k for k, _ in items]
    assert store.store.memory_prefix(keys, sealer) is not None  # held by the memory tier
    stages: dict[str, float] = {}
    with BusyLoop(store):
        got = store.get_prefix(keys, sealer, lambda k, s: stages.__setitem__(k, s))
    assert got == [b for _, b in items]
    assert set(stages) == {"fetch:memory", "verify"}
    assert store.get_prefix(keys, sealer) == got  # and the queued bookkeeping ran


def test_a_prefix_partly_below_memory_goes_through_the_loop(
    store: SyncTieredStore, tenant: Any
) -> None:
    sealer = tenant.sealer()
    hot, cold = tenant.chunks(2), tenant.chunks(1, start=2)
    store.put_chunks(hot, "hot", sealer)
    store.put_chunks(cold, "cold", sealer)  # disk only
    keys = [k for k, _ in hot + cold]
    with BusyLoop(store), pytest.raises(StoreError, match="timed out"):
        store.get_prefix(keys, sealer)  # needs the loop: waits for it
    assert store.get_prefix(keys, sealer) == [b for _, b in hot + cold]


def test_a_memory_blob_that_fails_verification_is_left_to_the_full_path(
    store: SyncTieredStore, tenant: Any
) -> None:
    sealer = tenant.sealer()
    items = tenant.chunks(2)
    store.put_chunks(items, "hot", sealer)
    memory = store.store.tier("memory")
    key = items[1][0]
    sealed = memory._data[key]  # type: ignore[attr-defined]
    memory._data[key] = sealed[:-1] + bytes([sealed[-1] ^ 1])  # type: ignore[attr-defined]
    keys = [k for k, _ in items]
    assert store.store.memory_prefix(keys, sealer) is None
    # the full path drops the bad copy and reads the good one from disk
    assert store.get_prefix(keys, sealer) == [b for _, b in items]
    assert store.store.memory_prefix(keys, sealer) is not None  # promoted back, good
