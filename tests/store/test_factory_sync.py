"""Configuration (settings → StoreConfig → store, with clear errors), the JSON hand-off to
other processes, the synchronous facade used from several threads, and import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kvtest.services import REDIS_URL

from kvaas.codec.sizing import SEAL_OVERHEAD_BYTES
from kvaas.config import Settings
from kvaas.store import (
    BlobTooLarge,
    ConfigurationError,
    DiskTier,
    MemoryTier,
    RedisRefIndex,
    SqliteRefIndex,
    StoreConfig,
    StoreError,
    SyncTieredStore,
    TieredStore,
    build_store,
)


def test_config_from_settings_and_json_round_trip(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        redis_url=REDIS_URL,
        redis_cluster=False,
        memory_tier_bytes=123_456,
        disk_tier_bytes=7_000_000,
    )
    cfg = StoreConfig.from_settings(settings)
    assert cfg == StoreConfig(
        memory_bytes=123_456,
        disk_dir=tmp_path / "chunks",
        disk_bytes=7_000_000,
        redis_url=REDIS_URL,
    )
    wire = json.loads(json.dumps(cfg.to_dict()))
    assert StoreConfig.from_dict(wire) == cfg
    no_disk = StoreConfig.from_settings(Settings(_env_file=None, disk_tier_bytes=0))  # type: ignore[call-arg]
    assert no_disk.disk_dir is None
    with pytest.raises(ConfigurationError, match="unknown store settings"):
        StoreConfig.from_dict({**wire, "colour": "blue"})


async def test_build_store_variants(tmp_path: Path, redis_prefix: str) -> None:
    embedded = build_store(StoreConfig(1 << 20, tmp_path / "d", 1 << 24, None))
    assert [type(t) for t in embedded.tiers] == [MemoryTier, DiskTier]
    assert isinstance(embedded.refs, SqliteRefIndex)
    assert embedded.refs.path == tmp_path / "d" / "index.sqlite3"
    await embedded.close()
    memory_only = build_store(StoreConfig(1 << 20, None, 0, None))
    assert [t.name for t in memory_only.tiers] == ["memory"]
    await memory_only.open()
    assert (await memory_only.health())["index"].status == "ok"
    await memory_only.close()
    full = build_store(
        StoreConfig(1 << 20, tmp_path / "d2", 1 << 24, REDIS_URL, redis_prefix=redis_prefix,
                    redis_ttl_s=60, eviction="size")
    )  # fmt: skip
    assert [t.name for t in full.tiers] == ["memory", "redis", "disk"]
    assert isinstance(full.refs, RedisRefIndex)
    await full.open()
    assert {n: h.status for n, h in (await full.health()).items()} == dict.fromkeys(
        ["memory", "redis", "disk", "index"], "ok"
    )
    await full.close()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"memory_bytes": 0, "disk_dir": None, "redis_url": None}, "at least one tier"),
        ({"memory_bytes": -1}, "memory tier budget"),
        ({"disk_bytes": 0}, "positive byte budget"),
        ({"max_chunk_bytes": 2 << 20}, "smaller than one chunk"),
        ({"redis_url": "http://nowhere"}, "invalid Redis URL"),
        ({"redis_url": REDIS_URL, "redis_prefix": "bad{prefix}"}, "invalid Redis key prefix"),
        ({"eviction": "random"}, "unknown eviction policy"),
        ({"redis_ttl_s": 0}, "redis_ttl_s"),
    ],
)
def test_impossible_configurations_fail_at_build_time(
    kwargs: dict[str, Any], message: str, tmp_path: Path
) -> None:
    base: dict[str, Any] = {
        "memory_bytes": 1 << 20,
        "disk_dir": tmp_path,
        "disk_bytes": 1 << 24,
        "redis_url": None,
    }
    with pytest.raises(ConfigurationError, match=message) as e:
        build_store(StoreConfig(**{**base, **kwargs}))
    assert e.value.status_code == 500


def test_tiered_store_constructor_checks(tmp_path: Path) -> None:
    refs = SqliteRefIndex(tmp_path / "i.db")
    with pytest.raises(ConfigurationError, match="unique"):
        TieredStore([MemoryTier(100), MemoryTier(100)], refs)
    with pytest.raises(ConfigurationError, match="cannot hold one"):
        TieredStore([MemoryTier(100)], refs, max_chunk_bytes=101)
    with pytest.raises(ConfigurationError, match="at least one tier"):
        TieredStore([], refs)


async def test_configured_chunk_limit_rejects_large_blobs(tmp_path: Path, tenant: Any) -> None:
    store = build_store(StoreConfig(1 << 20, tmp_path, 1 << 24, None, max_chunk_bytes=10_000))
    await store.open()
    fits = 10_000 - SEAL_OVERHEAD_BYTES  # the limit applies to the sealed chunk
    try:
        with pytest.raises(BlobTooLarge, match="10000-byte chunk limit"):
            await store.put_chunks(tenant.chunks(1, size=fits + 1), "cold", tenant.sealer())
        stored = await store.put_chunks(tenant.chunks(1, size=fits), "cold", tenant.sealer())
        assert stored == 10_000
    finally:
        await store.close()


def test_sync_store_from_four_threads(
    tmp_path: Path, redis_prefix: str, new_tenant: Callable[[], Any]
) -> None:
    cfg = StoreConfig(1 << 20, tmp_path / "d", 1 << 24, REDIS_URL, redis_prefix=redis_prefix)
    store = SyncTieredStore.from_config(cfg.to_dict())  # as a worker process receives it
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        try:
            t = new_tenant()
            barrier.wait()
            for v in range(1, 6):
                chunks = t.chunks(4, start=v)
                keys = [k for k, _ in chunks]
                m = t.manifest(keys, f"t{i}", v, storage_class=["hot", "standard", "cold"][v % 3])
                store.put_manifest(m)
                store.put_chunks(chunks, m.storage_class, t.sealer())
                assert store.get_prefix(keys, t.sealer()) == [b for _, b in chunks]
                assert store.longest_prefix(keys) == 4
                assert store.get_manifest(t.slot, f"t{i}", v) == m
                if v > 1:
                    assert store.delete_manifest(t.slot, f"t{i}", v - 1) is not None
                store.collect_garbage()
            assert store.list_versions(t.slot, f"t{i}") == [5]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
        assert not th.is_alive(), f"{th.name} still running after 60 s"
    assert not errors, errors
    assert set(store.usage()) == {"memory", "redis", "disk"}
    assert all(h.status == "ok" for h in store.health().values())
    store.close()
    store.close()  # idempotent
    assert store.closed
    with pytest.raises(StoreError, match="closed"):
        store.usage()


def test_store_never_imports_the_web_stack() -> None:
    code = (
        "import sys, kvaas.store, kvaas.store.sync, kvaas.store.factory\n"
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'starlette') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
