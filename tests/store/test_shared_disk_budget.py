"""Processes sharing a disk directory share its byte budget: each one's housekeeping recounts
the directory, so a process counts the chunks the others wrote (and forgets those they
deleted) and the directory stays within the budget."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvaas.store import StoreMaintenance, TieredStore
from kvaas.store.errors import StorageFull

BUDGET = 64 << 10


async def _store_cold(store: TieredStore, tenant: Any, start: int, cache_id: str) -> list[Any]:
    chunks = tenant.chunks(5, size=8 << 10, start=start)  # 40 KiB, referenced
    await store.put_manifest(
        tenant.manifest([k for k, _ in chunks], cache_id, storage_class="cold")
    )
    await store.put_chunks(chunks, "cold")
    return [k for k, _ in chunks]


async def test_two_processes_stay_within_one_disk_budget(
    make_store: Callable[..., TieredStore], tmp_path: Path, tenant: Any
) -> None:
    shared = tmp_path / "shared"
    common: dict[str, Any] = {
        "memory": None,
        "redis": False,
        "disk": BUDGET,
        "disk_dir": shared,
        "index_path": shared / "index.db",
    }
    a, b = make_store(**common), make_store(**common)
    await a.open()
    await b.open()
    await _store_cold(a, tenant, 0, "a")  # A: 40 KiB of the 64 KiB budget
    await StoreMaintenance(b).housekeeping_round()  # B learns what A wrote
    assert await b.tier("disk").bytes_used() >= 40 << 10
    with pytest.raises(StorageFull):  # 40 + 40 KiB of referenced chunks cannot fit in 64 KiB
        await _store_cold(b, tenant, 100, "b")
    # A deletes and collects its cache; after B's next housekeeping B has the room again
    await a.delete_manifest(tenant.slot, "a", 1)
    await a.collect_garbage()
    await StoreMaintenance(b).housekeeping_round()
    assert await b.tier("disk").bytes_used() < 40 << 10
    await _store_cold(b, tenant, 100, "b2")
