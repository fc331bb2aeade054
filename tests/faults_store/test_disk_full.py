"""A really full filesystem (a 2 MiB tmpfs) under the disk tier and the SQLite index.

The disk tier's byte budget is far above what the filesystem holds, as when the disk is shared
with other data or the budget was set too high: the store meets ``ENOSPC`` itself. Writes then
fail with the store-full error (507, a clear message), nothing partial is readable, releases
still commit (the index's reserve file), a write that meets a full disk first evicts
unreferenced chunks and retries, and once space is freed writes work again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvaas.codec import verify_blob
from kvaas.store import DiskTier, Manifest, SqliteRefIndex, TieredStore
from kvaas.store.errors import StorageFull

CHUNK = 48 << 10


async def _fill(store: TieredStore, tenant: Any) -> tuple[list[Manifest], Manifest, StorageFull]:
    """Store 4-chunk caches until the store is full; return the complete ones, the one whose
    write failed (its manifest stored) and the error."""
    done: list[Manifest] = []
    for i in range(200):
        chunks = tenant.chunks(4, size=CHUNK, start=4 * i)
        m = tenant.manifest([k for k, _ in chunks], cache_id=f"c{i}", storage_class="cold")
        try:
            await store.put_manifest(m)
            await store.put_chunks(chunks, "cold")
        except StorageFull as e:
            return done, m, e
        done.append(m)
    raise AssertionError("a 2 MiB filesystem never filled up")


def _files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]


async def test_disk_full_is_a_clean_507_and_space_comes_back(
    tmpfs: Callable[[str], Path], tenant: Any
) -> None:
    fs = tmpfs("2m")
    disk = DiskTier(fs / "chunks", 64 << 20)  # the budget would allow 64 MiB: ENOSPC comes first
    refs = SqliteRefIndex(fs / "index.sqlite3", reserve_bytes=128 << 10)
    store = TieredStore([disk], refs, encrypted=False)
    await store.open()
    try:
        done, failed, error = await _fill(store, tenant)
        assert done, "not even one cache fitted"
        assert error.status_code == 507 and error.type == "insufficient_storage"
        assert "full" in error.message.lower(), error.message
        assert "delete caches" in error.description.lower()
        # nothing partial: no temporary file, every chunk file is a whole, valid container
        files = _files(fs / "chunks")
        assert not [f for f in files if f.name.endswith(".tmp")]
        for f in files:
            verify_blob(f.read_bytes())
        # the failed cache reads as a clean prefix of its own chunks (at most), never wrong bytes
        want = dict(tenant.chunks(4, size=CHUNK, start=4 * len(done)))
        got = await store.get_prefix(list(failed.chunk_keys))
        assert len(got) < 4
        # its release (what the service does after a failed create) commits on the full disk,
        # and so do the releases of every other cache
        assert await store.delete_manifest(failed.namespace_slot, failed.cache_id, 1) is not None
        for m in done[:-1]:
            assert await store.delete_manifest(m.namespace_slot, m.cache_id, 1) is not None
        # a new write meets the full disk, evicts unreferenced chunks and succeeds (no GC ran)
        chunks = tenant.chunks(4, size=CHUNK, start=10_000)
        m = tenant.manifest([k for k, _ in chunks], cache_id="after", storage_class="cold")
        await store.put_manifest(m)
        await store.put_chunks(chunks, "cold")
        assert await store.get_prefix([k for k, _ in chunks]) == [b for _, b in chunks]
        # the last complete cache was kept whole through the eviction
        last = done[-1]
        assert len(await store.get_prefix(list(last.chunk_keys))) == 4
        # GC frees the rest; the index gets its reserve back
        for _ in range(10):
            if not (await store.collect_garbage()).claimed:
                break
        assert await refs.restore_reserve()
        assert refs.reserve_path.exists()
        for key, blob in want.items():
            assert await store.get_prefix([key]) in ([], [blob])
    finally:
        await store.close()


async def test_manifest_write_on_a_full_index_disk_is_store_full(
    tmpfs: Callable[[str], Path], tenant: Any
) -> None:
    """Storing a manifest does not use the reserve: on a full disk it is a clean 507 (the
    reserve stays for releases), and a release still commits."""
    fs = tmpfs("1m")
    refs = SqliteRefIndex(fs / "index.sqlite3", reserve_bytes=64 << 10)
    await refs.put_manifest(tenant.manifest(tenant.keys(64), cache_id="m0"))
    ballast = fs / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # fill the filesystem to the last block
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        with pytest.raises(StorageFull) as e:
            for i in range(1, 50):
                keys = tenant.keys(64, start=64 * i)
                await refs.put_manifest(tenant.manifest(keys, cache_id=f"m{i}"))
        assert e.value.status_code == 507
        assert refs.reserve_path.exists()
        assert await refs.delete_manifest(tenant.slot, "m0", 1) is not None
    finally:
        await refs.close()
