"""The scheduler's lookups remember chunks found present, never absent ones.

A real scheduler connector on a real disk store: a lookup whose keys were found present a
moment ago asks the store nothing (shown by deleting the chunks behind its back: it still
reports the hit, the documented stale case a failed load then corrects), a miss is asked
again every time, a short load makes the scheduler forget, and ``presence_ttl_s = 0`` turns
the memory off. A plan the gateway marked ``checked`` is trusted without a lookup until a load
of its request comes up short; the flag survives the plan's trip through ``kv_transfer_params``
on load plans only.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvaas import codec
from kvaas.connector import transfer_config
from kvaas.connector.connector import KVaaSConnector, KVaaSWorkerMetadata
from kvaas.connector.params import TransferPlan
from kvaas.connector.presence import PresenceCache
from kvaas.store.factory import StoreConfig
from kvaas.store.keys import ChunkKey
from kvaas.store.sync import SyncTieredStore

BLOCK, CHUNK, CHUNKS = 16, 32, 3


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_presence_cache_remembers_leading_keys_until_they_expire() -> None:
    clock = Clock()
    cache = PresenceCache(ttl_s=2.0, max_keys=3, clock=clock)
    keys = [ChunkKey(os.urandom(32)) for _ in range(4)]
    assert cache.leading(keys) == 0
    cache.remember(keys[:2])
    assert cache.leading(keys) == 2 and cache.leading(keys[1:]) == 1
    cache.remember(keys[2:])  # four keys, room for three: the oldest goes
    assert cache.leading(keys) == 0 and cache.leading(keys[1:]) == 3
    clock.now += 2.0
    assert cache.leading(keys[1:]) == 0  # expired
    cache.remember(keys[1:2])
    cache.forget(keys[1:2])
    assert cache.leading(keys[1:]) == 0
    off = PresenceCache(ttl_s=0, clock=clock)
    off.remember(keys)
    assert off.leading(keys) == 0 and len(off) == 0
    with pytest.raises(ValueError):
        PresenceCache(ttl_s=-1)


def _scheduler(path: Path, ttl: float | None) -> KVaaSConnector:
    store = StoreConfig(memory_bytes=0, disk_dir=path, disk_bytes=64 << 20, redis_url=None)
    transfer = transfer_config(store.to_dict())
    if ttl is not None:
        transfer["kv_connector_extra_config"]["presence_ttl_s"] = ttl
    cfg: Any = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(**transfer),
        cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
        parallel_config=SimpleNamespace(),
    )
    return KVaaSConnector(cfg, KVConnectorRole.SCHEDULER, None)  # type: ignore[arg-type]


def _lookup(
    s: KVaaSConnector, keys: tuple[ChunkKey, ...], rid: str = "r", *, checked: bool = False
) -> int:
    plan = TransferPlan("load", keys, CHUNK, "none", fingerprint="fp", checked=checked)
    req = SimpleNamespace(
        request_id=rid,
        kv_transfer_params=plan.to_params(),
        prompt_token_ids=list(range(CHUNKS * CHUNK + 1)),
    )
    n, _ = s.get_num_new_matched_tokens(req, 0)  # type: ignore[arg-type]
    assert n is not None
    return n // CHUNK


def _put(path: Path, keys: tuple[ChunkKey, ...]) -> None:
    import torch

    blob = codec.encode(torch.zeros(1, 2, CHUNK, 1, 8), "none")
    cfg = StoreConfig(
        memory_bytes=0, disk_dir=path, disk_bytes=64 << 20, redis_url=None, encrypted=False
    )
    with SyncTieredStore.from_config(cfg) as store:
        store.put_chunks([(k, blob) for k in keys], "cold")


def _delete(path: Path, keys: tuple[ChunkKey, ...]) -> None:
    cfg = StoreConfig(memory_bytes=0, disk_dir=path, disk_bytes=64 << 20, redis_url=None)
    with SyncTieredStore.from_config(cfg) as store:
        store._call(store.store.tier("disk").delete_many, list(keys))


@pytest.mark.parametrize("ttl", [None, 0.0], ids=["default-ttl", "off"])
def test_found_chunks_are_not_asked_for_again(tmp_path: Path, ttl: float | None) -> None:
    keys = tuple(ChunkKey(secrets.token_bytes(32)) for _ in range(CHUNKS))
    sched = _scheduler(tmp_path, ttl)
    try:
        assert _lookup(sched, keys) == 0  # nothing stored: a miss is not remembered
        _put(tmp_path, keys[:2])
        assert _lookup(sched, keys) == 2
        _put(tmp_path, keys[2:])
        assert _lookup(sched, keys) == 3  # the remembered two, the store for the third
        _delete(tmp_path, keys)
        # remembered: no I/O, the hit stands (a stale promise the worker's failed load
        # corrects); with the memory off the store is asked and answers a miss
        assert _lookup(sched, keys) == (3 if ttl is None else 0)
        # a short load of a request that looked these keys up makes the scheduler forget
        sched.update_connector_output(
            SimpleNamespace(kv_connector_worker_meta=KVaaSWorkerMetadata({"r": 0}))
        )
        assert _lookup(sched, keys, "r2") == 0
    finally:
        sched.shutdown()


def test_a_checked_plan_is_trusted_until_its_load_comes_up_short(tmp_path: Path) -> None:
    keys = tuple(ChunkKey(secrets.token_bytes(32)) for _ in range(CHUNKS))
    sched = _scheduler(tmp_path, 0.0)  # no presence memory: only the check can make a hit
    try:
        # nothing is stored, and the checked plan still matches: the store was not asked
        assert _lookup(sched, keys, "a", checked=True) == CHUNKS
        assert _lookup(sched, keys, "b") == 0  # the same keys unchecked: the store says no
        # the worker found nothing for "a": scheduled again, it is looked up like any plan
        sched.update_connector_output(
            SimpleNamespace(kv_connector_worker_meta=KVaaSWorkerMetadata({"a": 0}))
        )
        assert _lookup(sched, keys, "a", checked=True) == 0
        _put(tmp_path, keys[:2])
        assert _lookup(sched, keys, "a", checked=True) == 2
        assert _lookup(sched, keys, "c", checked=True) == CHUNKS  # another request: trusted
    finally:
        sched.shutdown()


def test_checked_travels_with_load_plans_only() -> None:
    keys = tuple(ChunkKey(secrets.token_bytes(32)) for _ in range(2))
    load = TransferPlan("load", keys, CHUNK, checked=True)
    assert TransferPlan.from_params(load.to_params()) == load
    assert load.leading(1).checked  # a checked plan's leading keys were checked too
    plain = TransferPlan("load", keys, CHUNK)
    assert "checked" not in plain.to_params()["kvaas"]
    assert TransferPlan.from_params(plain.to_params()) == plain
    save = TransferPlan("save", keys, CHUNK, checked=True).to_params()
    parsed = TransferPlan.from_params(save)
    assert parsed is not None and not parsed.checked  # a save plan is always looked up
    for bad in ("true", 1, None):
        doc = load.to_params()
        doc["kvaas"]["checked"] = bad
        with pytest.raises(ValueError, match="checked"):
            TransferPlan.from_params(doc)
