"""Encryption at rest on real tiers (the test Redis, files under ``tmp_path``): every tier holds
sealed chunks; a blob altered, moved under another key, sealed under another tenant's key or
under an unknown key is a counted miss, never loaded; rotation; file and key-file permissions."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kvtest.damage import flip_redis_bytes
from prometheus_client import REGISTRY
from pydantic import ValidationError

from kvaas.codec.sizing import SEAL_OVERHEAD_BYTES
from kvaas.config import Settings
from kvaas.store import (
    ChunkSealer,
    ConfigurationError,
    ForeignSeal,
    MasterKeys,
    RedisTier,
    SealError,
    SqliteRefIndex,
    StoreConfig,
    TieredStore,
    build_store,
)
from kvaas.store.crypto import HEADER_BYTES, MAGIC, MASTER_KEY_FILE, OVERHEAD, load_or_create_key
from kvaas.store.disk import DiskTier

MASTER_HEX = bytes(range(32)).hex()  # the key of the fixtures' ``tenant.sealer()``
NEW_KEY = bytes(range(100, 132))


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def corrupt_reads(tier: str) -> float:
    return sample("kvaas_store_corrupt_reads_total", tier=tier)


def foreign_reads(tier: str) -> float:
    return sample("kvaas_store_foreign_seal_reads_total", tier=tier)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_umask() -> Iterator[None]:
    """umask 0: the modes seen are the ones the code asks for, not the umask's."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- the sealed format -----------------------------------------------------------------------------
def test_seal_and_open(tenant: Any) -> None:
    (key, blob), (other, _) = tenant.chunks(2)
    sealer = tenant.sealer()
    sealed = sealer.seal(key, blob)
    assert OVERHEAD == SEAL_OVERHEAD_BYTES == len(sealed) - len(blob)
    assert sealed.startswith(MAGIC) and sealed[5:7] == b"k1"
    assert blob not in sealed  # ciphertext, not the container
    assert sealer.seal(key, blob) != sealed  # a fresh nonce each time
    assert sealer.open(key, sealed) == blob
    with pytest.raises(SealError, match="authentication failed"):
        sealer.open(other, sealed)  # moved under another key
    with pytest.raises(SealError, match="authentication failed"):  # another scheme or model
        ChunkSealer(sealer.keys, "test-model", "int4").open(key, sealed)
    with pytest.raises(SealError, match="authentication failed"):
        ChunkSealer(sealer.keys, "other-model", "none").open(key, sealed)
    with pytest.raises(SealError, match="not a sealed chunk"):
        sealer.open(key, blob)
    with pytest.raises(SealError, match="truncated"):
        sealer.open(key, sealed[: OVERHEAD - 1])


# -- moved and altered blobs -----------------------------------------------------------------------
@pytest.mark.parametrize("tier_name", ["redis", "disk"])
async def test_blob_moved_under_another_key_is_a_counted_miss(
    make_store: Callable[..., TieredStore], tenant: Any, tier_name: str
) -> None:
    store = make_store(memory=None, redis=tier_name == "redis", disk=8 << 20, encrypted=True)
    await store.open()
    chunks = tenant.chunks(3)
    keys = [k for k, _ in chunks]
    sealer = tenant.sealer()
    cls = "standard" if tier_name == "redis" else "cold"
    await store.put_manifest(tenant.manifest(keys, storage_class=cls))
    await store.put_chunks(chunks, cls, sealer)
    tier = store.tier(tier_name)
    # whoever can write to the tier puts chunk 2's (valid, sealed) blob under chunk 0's key
    (moved,) = await tier.get_many([keys[2]])
    assert moved is not None
    await tier.delete_many([keys[0]])
    await tier.put_many([(keys[0], moved)])
    if isinstance(tier, DiskTier):
        assert tier.path_of(keys[0]).read_bytes() == bytes(moved)  # a real file holds it
    before = corrupt_reads(tier_name)
    assert await store.get_prefix(keys, sealer) == []  # chunk 0 is a miss: no prefix at all
    assert corrupt_reads(tier_name) - before == 1
    assert await tier.exists_many(keys) == [False, True, True]  # the moved copy was removed
    assert await store.get_prefix(keys[1:], sealer) == [b for _, b in chunks[1:]]
    await store.put_chunks(chunks[:1], cls, sealer)  # rewriting the chunk heals the prefix
    assert await store.get_prefix(keys, sealer) == [b for _, b in chunks]


@pytest.mark.parametrize("offset", [30, HEADER_BYTES, HEADER_BYTES + 1000, -1])
async def test_flipped_byte_of_nonce_ciphertext_or_tag_is_a_miss(
    make_store: Callable[..., TieredStore], tenant: Any, offset: int
) -> None:
    store = make_store(redis=False, encrypted=True)
    await store.open()
    chunks = tenant.chunks(2)
    keys = [k for k, _ in chunks]
    sealer = tenant.sealer()
    await store.put_chunks(chunks, "cold", sealer)
    disk = store.tier("disk")
    assert isinstance(disk, DiskTier)
    path = disk.path_of(keys[1])
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    before = corrupt_reads("disk")
    assert await store.get_prefix(keys, sealer) == [chunks[0][1]]  # never the altered chunk
    assert corrupt_reads("disk") - before == 1
    assert not path.exists()


async def test_redis_copy_failing_authentication_falls_back_to_disk(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(memory=None, encrypted=True)
    await store.open()
    chunks = tenant.chunks(2)
    keys = [k for k, _ in chunks]
    sealer = tenant.sealer()
    await store.put_manifest(tenant.manifest(keys, storage_class="standard"))
    await store.put_chunks(chunks, "standard", sealer)
    redis = store.tier("redis")
    assert isinstance(redis, RedisTier)
    good = await redis.get_many(keys)
    await store.tier("disk").put_many([(k, b) for k, b in zip(keys, good, strict=True) if b])
    await flip_redis_bytes(redis, keys[1], HEADER_BYTES + 5)
    before = corrupt_reads("redis")
    assert await store.get_prefix(keys, sealer) == [b for _, b in chunks]
    assert corrupt_reads("redis") - before == 1
    assert await redis.get_many(keys) == good  # the good sealed copy was promoted back


# -- keys ------------------------------------------------------------------------------------------
async def test_another_tenants_key_cannot_open_and_leaves_the_chunk(
    make_store: Callable[..., TieredStore], tenant: Any, new_tenant: Callable[[], Any]
) -> None:
    store = make_store(memory=None, encrypted=True)
    await store.open()
    chunks = tenant.chunks(2)
    keys = [k for k, _ in chunks]
    await store.put_manifest(tenant.manifest(keys, storage_class="standard"))
    await store.put_chunks(chunks, "standard", tenant.sealer())
    intruder = new_tenant().sealer()
    with pytest.raises(ForeignSeal):
        intruder.open(keys[0], (await store.tier("redis").get_many(keys[:1]))[0])
    before = foreign_reads("redis")
    assert await store.get_prefix(keys, intruder) == []
    assert foreign_reads("redis") - before == 2  # both chunks read, neither opened
    # another master key under the same key id (a misconfigured gateway) cannot open it either
    other_master = MasterKeys("k1", {"k1": NEW_KEY})
    assert await store.get_prefix(keys, tenant.sealer(other_master)) == []
    # neither removed anything: the tenant still reads its chunks
    assert await store.get_prefix(keys, tenant.sealer()) == [b for _, b in chunks]


async def test_sealer_required_and_plaintext_refused(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(memory=1 << 20, redis=False, disk=None, encrypted=True)
    await store.open()
    chunks = tenant.chunks(2)
    keys = [k for k, _ in chunks]
    with pytest.raises(ConfigurationError, match="encrypted chunks only"):
        await store.put_chunks(chunks, "hot")
    with pytest.raises(ConfigurationError, match="encrypted chunks only"):
        await store.get_prefix(keys)
    # a plaintext container written straight into the tier is never served
    await store.tier("memory").put_many(chunks)
    before = corrupt_reads("memory")
    assert await store.get_prefix(keys, tenant.sealer()) == []
    assert corrupt_reads("memory") - before == 2
    assert await store.tier("memory").exists_many(keys) == [False, False]
    plain = make_store(memory=1 << 20, redis=False, disk=None)
    with pytest.raises(ConfigurationError, match="without encryption"):
        await plain.put_chunks(chunks, "hot", tenant.sealer())


async def test_every_tier_holds_the_sealed_bytes(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(encrypted=True)
    await store.open()
    chunks = tenant.chunks(3)
    keys = [k for k, _ in chunks]
    sealer = tenant.sealer()
    await store.put_manifest(tenant.manifest(keys, storage_class="cold"))
    await store.put_chunks(chunks, "cold", sealer)
    on_disk = await store.tier("disk").get_many(keys)
    assert all(b is not None and bytes(b).startswith(MAGIC) for b in on_disk)
    assert await store.get_prefix(keys, sealer) == [b for _, b in chunks]
    assert await store.tier("memory").get_many(keys) == on_disk  # promoted as sealed
    # a class change copies sealed chunks as they are (no key needed)
    await store.set_storage_class(tenant.slot, "c1", 1, "standard")
    assert await store.tier("redis").get_many(keys) == on_disk
    assert await store.get_prefix(keys, sealer) == [b for _, b in chunks]


async def test_rotation_keeps_old_key_ids_readable(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(memory=None, redis=False, encrypted=True)
    await store.open()
    old, new = tenant.chunks(2, start=0), tenant.chunks(2, start=5)
    await store.put_chunks(old, "cold", tenant.sealer())  # sealed under k1
    rotated = MasterKeys("k2", {"k2": NEW_KEY, "k1": bytes.fromhex(MASTER_HEX)})
    sealer = tenant.sealer(rotated)
    await store.put_chunks(new, "cold", sealer)
    disk = store.tier("disk")
    assert isinstance(disk, DiskTier)
    assert disk.path_of(new[0][0]).read_bytes()[5:7] == b"k2"
    assert disk.path_of(old[0][0]).read_bytes()[5:7] == b"k1"
    for chunks in (old, new):
        assert await store.get_prefix([k for k, _ in chunks], sealer) == [b for _, b in chunks]
    # once k1 is dropped from the configuration its chunks are misses, but stay stored
    only_new = tenant.sealer(MasterKeys("k2", {"k2": NEW_KEY}))
    before = foreign_reads("disk")
    assert await store.get_prefix([k for k, _ in old], only_new) == []
    assert foreign_reads("disk") - before == 2
    assert await disk.exists_many([k for k, _ in old]) == [True, True]


def test_rotation_from_settings(tmp_path: Path, tenant: Any) -> None:
    first = MasterKeys.from_settings(
        Settings(_env_file=None, data_dir=tmp_path, encryption_key=MASTER_HEX)  # type: ignore[call-arg]
    )
    rotated = MasterKeys.from_settings(
        Settings(  # type: ignore[call-arg]
            _env_file=None,
            data_dir=tmp_path,
            encryption_key=NEW_KEY.hex(),
            encryption_key_id="k2",
            encryption_old_keys=f"k1:{MASTER_HEX}",
        )
    )
    assert (first.current, rotated.current, rotated.key_ids) == ("k1", "k2", ["k2", "k1"])
    ((key, blob),) = tenant.chunks(1)
    sealed = ChunkSealer(first.tenant_keys(tenant.namespace), "m", "none").seal(key, blob)
    assert ChunkSealer(rotated.tenant_keys(tenant.namespace), "m", "none").open(key, sealed) == blob
    assert not (tmp_path / MASTER_KEY_FILE).exists()  # a configured key generates no file
    with pytest.raises(ConfigurationError, match="twice or as the current id"):
        MasterKeys.from_settings(
            Settings(  # type: ignore[call-arg]
                _env_file=None, encryption_key=MASTER_HEX, encryption_old_keys=f"k1:{MASTER_HEX}"
            )
        )


def test_key_settings_accept_hex_and_base64_and_never_echo_a_key() -> None:
    import base64

    as_b64 = base64.b64encode(NEW_KEY).decode()
    as_url = base64.urlsafe_b64encode(NEW_KEY).decode().rstrip("=")
    for text in (NEW_KEY.hex(), NEW_KEY.hex().upper(), as_b64, as_url):
        s = Settings(_env_file=None, encryption_key=text)  # type: ignore[call-arg]
        assert s.encryption_key is not None
        assert s.encryption_key.get_secret_value() == NEW_KEY.hex()
    for bad in (NEW_KEY.hex()[:-2], "not a key at all", as_b64[:-4]):
        with pytest.raises(ValidationError, match="encryption_key") as e:
            Settings(_env_file=None, encryption_key=bad)  # type: ignore[call-arg]
        assert bad not in str(e.value) and "32 bytes" in str(e.value)
    with pytest.raises(ValidationError, match="id:key") as e:
        Settings(_env_file=None, encryption_old_keys=NEW_KEY.hex())  # type: ignore[call-arg]
    assert NEW_KEY.hex() not in str(e.value)
    with pytest.raises(ValidationError, match="encryption_key_id"):
        Settings(_env_file=None, encryption_key_id="no spaces")  # type: ignore[call-arg]


def test_generated_master_key_is_0600_and_reused(tmp_path: Path, no_umask: None) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    first = MasterKeys.from_settings(settings)
    path = tmp_path / "data" / MASTER_KEY_FILE
    assert mode(path) == 0o600
    assert len(bytes.fromhex(path.read_text())) == 32
    ns = bytes(32)
    again = MasterKeys.from_settings(settings)  # a later start: the same key
    assert again.tenant_keys(ns) == first.tenant_keys(ns)
    assert [p.name for p in path.parent.iterdir()] == [MASTER_KEY_FILE]  # no temporary left
    path.write_text("too short\n")
    with pytest.raises(ConfigurationError, match="does not hold a 32-byte key"):
        MasterKeys.from_settings(settings)


def test_concurrent_starters_agree_on_one_generated_key(tmp_path: Path) -> None:
    path = tmp_path / MASTER_KEY_FILE
    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        keys.append(load_or_create_key(path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert bytes.fromhex(path.read_text()) == keys[0]


# -- files -----------------------------------------------------------------------------------------
async def test_disk_tier_files_0600_dirs_0700_index_0600(
    tmp_path: Path, tenant: Any, no_umask: None
) -> None:
    root = tmp_path / "chunks"
    root.mkdir(mode=0o755)  # made before, too open: tightened on open
    store = build_store(StoreConfig(0, root, 1 << 24, None))
    await store.open()
    try:
        chunks = tenant.chunks(3)
        await store.put_manifest(tenant.manifest([k for k, _ in chunks], storage_class="cold"))
        await store.put_chunks(chunks, "cold", tenant.sealer())
        disk = store.tier("disk")
        assert isinstance(disk, DiskTier)
        assert mode(root) == 0o700
        for k, _ in chunks:
            path = disk.path_of(k)
            assert mode(path) == 0o600
            assert mode(path.parent) == mode(path.parent.parent) == 0o700
        assert isinstance(store.refs, SqliteRefIndex)
        index = store.refs.path
        assert index.parent == root
        db_files = [index, *(p for p in root.iterdir() if p.name.startswith(index.name + "-"))]
        assert len(db_files) >= 2  # the WAL too
        assert {p.name: mode(p) for p in db_files} == {p.name: 0o600 for p in db_files}
    finally:
        await store.close()


def test_master_key_file_parent_is_created_private(tmp_path: Path, no_umask: None) -> None:
    load_or_create_key(tmp_path / "new" / MASTER_KEY_FILE)
    assert mode(tmp_path / "new") == 0o700


def test_master_keys_reject_bad_keys() -> None:
    with pytest.raises(ConfigurationError, match="32 bytes"):
        MasterKeys("k1", {"k1": b"short"})
    with pytest.raises(ConfigurationError, match="current key id"):
        MasterKeys("k2", {"k1": bytes(32)})
    with pytest.raises(ConfigurationError, match="key id"):
        MasterKeys("bad id", {"bad id": bytes(32)})
