"""Fixtures of the store tests: real tiers only (the Redis server of the test environment, real
files under ``tmp_path``, a Redis Cluster started on free ports), each test on its own key
prefix, cleaned up afterwards."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import torch
from kvtest.prereq import require, require_program
from kvtest.redis_cluster import free_cluster_port
from kvtest.redis_cluster import redis_cluster as started_cluster
from kvtest.services import REDIS_URL

from kvaas.codec import scheme_id
from kvaas.codec.container import pack
from kvaas.store import (
    ChunkKey,
    ChunkSealer,
    DiskTier,
    Manifest,
    MasterKeys,
    MemoryTier,
    RedisConnection,
    RedisRefIndex,
    RedisTier,
    SqliteRefIndex,
    TieredStore,
    chunk_keys,
    derive_namespace,
    namespace_slot,
)
from kvaas.store.breaker import CircuitBreaker

_NONE_ID = scheme_id("none")
MASTER = MasterKeys("k1", {"k1": bytes(range(32))})
"""The master keys of the tests' encrypted stores."""


def make_blob(size: int, seed: int = 0) -> bytes:
    """A valid codec container of ``size`` total bytes around random payload bytes."""
    payload = secrets.token_bytes(max(0, size - 36)) if seed == 0 else _seeded(size - 36, seed)
    return pack(_NONE_ID, torch.Size([1, 2, 1, 1, 1]), torch.bfloat16, {}, payload)


def _seeded(n: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (max(0, n),), generator=g, dtype=torch.uint8).numpy().tobytes()


class Tenant:
    """A tenant namespace and helpers to make keys, chunks and manifests of it."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.namespace = derive_namespace(secret or secrets.token_bytes(32))
        self.slot = namespace_slot(self.namespace)

    def keys(self, n: int, *, start: int = 0, chunk_tokens: int = 16) -> list[ChunkKey]:
        tokens = [(start * 7919 + i) % 50_000 for i in range(n * chunk_tokens)]
        return chunk_keys(
            tokens,
            namespace=self.namespace,
            model_fingerprint="test-model",
            scheme_id="none",
            chunk_tokens=chunk_tokens,
        )

    def sealer(self, master: MasterKeys = MASTER) -> ChunkSealer:
        """What seals and opens this tenant's chunks (of ``keys``' model and scheme)."""
        return ChunkSealer(master.tenant_keys(self.namespace), "test-model", "none")

    def chunks(self, n: int, size: int = 2048, *, start: int = 0) -> list[tuple[ChunkKey, bytes]]:
        return [(k, make_blob(size)) for k in self.keys(n, start=start)]

    def manifest(
        self,
        keys: list[ChunkKey],
        cache_id: str = "c1",
        version: int = 1,
        storage_class: str = "standard",
    ) -> Manifest:
        return Manifest(
            cache_id=cache_id,
            version=version,
            namespace_slot=self.slot,
            chunk_keys=tuple(keys),
            token_count=len(keys) * 16,
            chunk_tokens=16,
            scheme="none",
            model_fingerprint="test-model",
            storage_class=storage_class,  # type: ignore[arg-type]
        )


@pytest.fixture
def tenant() -> Tenant:
    return Tenant()


def fast_breaker() -> CircuitBreaker:
    return CircuitBreaker(base_delay=0.05, max_delay=0.5, probe_timeout=2.0)


async def cleanup_prefix(url: str, prefix: str, *, cluster: bool = False) -> None:
    conn = RedisConnection(url, cluster=cluster, prefix=prefix)
    try:
        names = await conn.scan_keys(f"{prefix}:*")
        for name in names:
            await conn.run(lambda c, n=name: c.delete(n))
    finally:
        await conn.close()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A fresh key prefix on the test Redis; every key under it is deleted afterwards."""
    prefix = f"kvt-{secrets.token_hex(4)}"
    yield prefix
    await cleanup_prefix(REDIS_URL, prefix)


@pytest.fixture
def make_conn(redis_prefix: str) -> Iterator[Callable[..., RedisConnection]]:
    """Build :class:`RedisConnection`s on the test prefix (closed by the store that owns them)."""

    def factory(url: str = REDIS_URL, **kwargs: object) -> RedisConnection:
        kwargs.setdefault("breaker", fast_breaker())
        return RedisConnection(url, prefix=redis_prefix, **kwargs)  # type: ignore[arg-type]

    yield factory


StoreFactory = Callable[..., TieredStore]


@pytest.fixture
async def make_store(
    tmp_path: Path, make_conn: Callable[..., RedisConnection]
) -> AsyncIterator[StoreFactory]:
    """``make_store(memory=..., redis=bool, disk=..., index="sqlite"|"redis", **kw)``: an opened
    tiered store on real tiers; closed at the end of the test. Unless ``encrypted=True`` is
    passed, the store keeps plain codec containers: the tier contracts (placement, promotion,
    eviction, GC) do not depend on sealing, which ``test_encryption.py`` covers."""
    stores: list[TieredStore] = []

    def factory(
        *,
        memory: int | None = 1 << 20,
        redis: bool = True,
        disk: int | None = 8 << 20,
        index: str | None = None,
        disk_dir: Path | None = None,
        conn: RedisConnection | None = None,
        index_path: Path | None = None,
        **kwargs: object,
    ) -> TieredStore:
        tiers = []
        if memory:
            tiers.append(MemoryTier(memory))
        c = conn
        if redis:
            c = c or make_conn()
            tiers.append(RedisTier(c))
        if disk:
            tiers.append(DiskTier(disk_dir or tmp_path / "disk", disk, durable=False))
        kind = index or ("redis" if redis else "sqlite")
        if kind == "redis":
            refs = RedisRefIndex(c or make_conn())
        else:
            refs = SqliteRefIndex(
                index_path or (disk_dir or tmp_path) / f"index-{len(stores)}.sqlite3"
            )
        kwargs.setdefault("encrypted", False)
        store = TieredStore(tiers, refs, **kwargs)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield factory
    for s in stores:
        await s.close()


# -- a Redis Cluster of three primaries on free ports ---------------------------------------------
@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-primary Redis Cluster started once for the test session (on demand); yields its
    entry URL. Needs ``redis-server`` and ``redis-cli`` (see :func:`kvtest.prereq.require`)."""
    root = tmp_path_factory.mktemp("cluster")
    with started_cluster(root, masters=3, replicas=0, node_timeout_ms=2000) as rc:
        yield f"redis://127.0.0.1:{rc.ports[0]}/0"


def _wait_ping(cli: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = subprocess.run([cli, "-p", str(port), "ping"], capture_output=True, timeout=5)
        if r.stdout.strip() == b"PONG":
            return
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not start")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A mounted 1 MiB tmpfs: a filesystem that really fills up (ENOSPC). Needs root and
    ``mount`` (see :func:`kvtest.prereq.require`)."""
    require(os.geteuid() == 0, "root (to mount a 1 MiB tmpfs for a real ENOSPC)")
    mount = require_program("mount")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    require(r.returncode == 0, f"permission to mount a tmpfs ({r.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def blob() -> Callable[..., bytes]:
    """``blob(size, seed=0)``: a valid codec container of ``size`` bytes (random payload)."""
    return make_blob


@pytest.fixture
def new_tenant() -> Callable[[], Tenant]:
    return Tenant


@pytest.fixture
def redis_cleanup() -> Callable[..., object]:
    """``await redis_cleanup(url, prefix, cluster=False)`` deletes every key under a prefix."""
    return cleanup_prefix


class PrivateRedis:
    """A ``redis-server`` of this test alone, on a free port: it can be killed and restarted."""

    def __init__(self, root: Path, *args: str) -> None:
        self.server = require_program("redis-server")
        self.cli = require_program("redis-cli")
        self.root = root
        self.args = args
        self.port = free_cluster_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root), *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_ping(self.cli, self.port)

    def kill(self) -> None:
        """SIGKILL: the server dies without closing anything cleanly."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=5)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    """``private_redis(*server_args)``: a started private Redis, killed after the test."""
    servers: list[PrivateRedis] = []

    def factory(*args: str) -> PrivateRedis:
        d = tmp_path / f"redis-{len(servers)}"
        d.mkdir()
        r = PrivateRedis(d, *args)
        servers.append(r)
        r.start()
        return r

    yield factory
    for r in servers:
        r.kill()


@pytest.fixture
async def cluster_conn(redis_cluster: str) -> AsyncIterator[RedisConnection]:
    """A connection to the session's Redis Cluster on a fresh prefix (keys deleted after)."""
    prefix = f"kvt-{secrets.token_hex(4)}"
    yield RedisConnection(redis_cluster, cluster=True, prefix=prefix, breaker=CircuitBreaker())
    await cleanup_prefix(redis_cluster, prefix, cluster=True)
