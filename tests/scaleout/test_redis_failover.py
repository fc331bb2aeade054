"""A Redis Cluster master SIGKILLed under load: its replica takes over and the store's client
follows it without a restart.

A tiered store whose only tier and reference index are a real 3-master / 3-replica Redis
Cluster (:mod:`kvtest.redis_cluster`, production defaults of :class:`RedisConnection` and its
circuit breaker) runs one writer per tenant (two tenants per master, so every master holds
some): each round stores a new cache version (manifest, then chunks; the versions of a tenant
share a 4-chunk prefix, so those chunks carry several references), reads it back, and deletes
the previous version. The master holding the first tenant's slot is SIGKILLed mid-load; the
test waits until its replica says it is a master with the dead master's slots and every live
node reports ``cluster_state:ok``. Checked:

- **clean failures only**: every operation either succeeded or raised a store error
  (``TierUnavailable``: retry later; ``StoreError``); nothing else escapes;
- **never wrong KV**: every chunk read back, before, during and after the failover, is
  bit-exact with what was written under its key, or absent (a chunk lost with the master
  ends the prefix there: a miss);
- **recovery without a restart**: after the failover every writer completes rounds again
  with the same client (stale slot map, dead connections and the circuit breaker all cleared);
- **nothing double-counted**: afterwards the index in Redis is consistent with itself. For
  every chunk, its reference hash holds, per storage class, exactly the number of stored
  manifests that list it; no reference hash exists without a manifest listing it; each
  cache's version set equals its stored manifests; no GC candidate has a reference.
"""

from __future__ import annotations

import asyncio
import collections
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from kvtest.gateway import ADMIN_TOKEN, running_app
from kvtest.redis_cluster import RedisClusterProcs, redis_cluster

from kvaas.codec import scheme_id
from kvaas.codec.container import pack
from kvaas.store import (
    ChunkKey,
    Manifest,
    RedisConnection,
    RedisRefIndex,
    RedisTier,
    StoreError,
    TieredStore,
    TierUnavailable,
    chunk_keys,
    derive_namespace,
    namespace_slot,
)

pytestmark = [pytest.mark.slow]

SHARED = 4  # chunks every version of a tenant shares (several references each)
OWN = 2  # chunks of each version alone
CHUNK_TOKENS = 16
ROUNDS_BEFORE_KILL = 5  # rounds every writer completes before the master is killed
ROUNDS_AFTER = 5  # rounds every writer completes after the failover, same client
RECOVERY_LIMIT_S = 120.0  # a hang guard only (the failure message says what did not recover)

_NONE = scheme_id("none")


def blob_for(key: ChunkKey) -> bytes:
    """The chunk stored under ``key``: a codec container whose payload derives from the key,
    so a chunk read back under another key's name is caught."""
    g = torch.Generator().manual_seed(int.from_bytes(bytes(key)[-8:], "little"))
    payload = torch.randint(0, 256, (3000,), generator=g, dtype=torch.uint8).numpy().tobytes()
    return pack(_NONE, torch.Size([1, 2, 1, 1, 1]), torch.bfloat16, {}, bytes(key) + payload)


@dataclass
class Writer:
    """One tenant's load: its slot, the versions it stored, what happened."""

    namespace: bytes
    slot: str
    rounds_ok: int = 0
    last_ok: float = 0.0  # time.monotonic() of the last round that succeeded
    version: int = 0
    pending: Manifest | None = None  # the version a failed round retries (same created_at)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    wrong: list[str] = field(default_factory=list)
    unclean: list[str] = field(default_factory=list)

    def keys(self, version: int) -> list[ChunkKey]:
        shared = [(int(self.slot, 16) + i) % 50_000 for i in range(SHARED * CHUNK_TOKENS)]
        own = [(version * 7919 + i) % 50_000 for i in range(OWN * CHUNK_TOKENS)]
        return chunk_keys(
            shared + own,
            namespace=self.namespace,
            model_fingerprint="test-model",
            scheme_id="none",
            chunk_tokens=CHUNK_TOKENS,
        )

    def manifest(self, version: int) -> Manifest:
        keys = self.keys(version)
        return Manifest(
            cache_id="c",
            version=version,
            namespace_slot=self.slot,
            chunk_keys=tuple(keys),
            token_count=len(keys) * CHUNK_TOKENS,
            chunk_tokens=CHUNK_TOKENS,
            scheme="none",
            model_fingerprint="test-model",
            storage_class="standard",
        )


def tenants_on_every_master(rc: RedisClusterProcs, conn: RedisConnection) -> list[Writer]:
    """Two tenants whose slots live on each master (found by drawing namespaces)."""
    per: dict[int, list[Writer]] = {m.port: [] for m in rc.live_masters()}
    while any(len(v) < 2 for v in per.values()):
        ns = derive_namespace(secrets.token_bytes(32))
        slot = namespace_slot(ns)
        port = rc.master_of(conn.keys.counter(slot)).port
        if len(per[port]) < 2:
            per[port].append(Writer(ns, slot))
    return [w for ws in per.values() for w in ws]


async def one_round(store: TieredStore, w: Writer) -> None:
    """Store version ``w.version + 1``, read it back (checked), delete the version before. A
    round that failed is retried with the same manifest, as a caller retrying would."""
    v = w.version + 1
    if w.pending is None or w.pending.version != v:
        w.pending = w.manifest(v)  # a retried round resends the identical manifest
    m = w.pending
    step = "put_manifest"
    try:
        await store.put_manifest(m)
        step = "put_chunks"
        await store.put_chunks([(k, blob_for(k)) for k in m.chunk_keys], "standard")
        step = "get_prefix"
        got = await store.get_prefix(list(m.chunk_keys))
        for k, b in zip(m.chunk_keys, got, strict=False):
            if b != blob_for(k):
                w.wrong.append(f"version {v}: chunk {k.hex()[:16]} read back different bytes")
        w.version = v
        if v > 1:
            step = "delete_manifest"
            await store.delete_manifest(w.slot, "c", v - 1)
        w.rounds_ok += 1
        w.last_ok = time.monotonic()
        w.outcomes["ok"] += 1
    except StoreError as e:  # TierUnavailable is one: a clear, retryable answer
        w.outcomes[f"{step}: {type(e).__name__}"] += 1
        await asyncio.sleep(0.1)
    except Exception as e:  # anything else is what the test looks for
        w.unclean.append(f"{step}: {type(e).__name__}: {e}")
        await asyncio.sleep(0.1)


async def run_until(store: TieredStore, writers: list[Writer], done: object, what: str) -> None:
    """Every writer runs rounds until ``done()`` (checked between rounds) is true."""
    deadline = time.monotonic() + RECOVERY_LIMIT_S

    async def loop(w: Writer) -> None:
        while not done():  # type: ignore[operator]
            if time.monotonic() > deadline:
                return
            await one_round(store, w)

    await asyncio.gather(*(loop(w) for w in writers))
    if not done():  # type: ignore[operator]
        stuck = {w.slot: dict(w.outcomes) for w in writers}
        pytest.fail(f"{what} did not happen; outcomes per tenant: {stuck}")


async def index_consistency(conn: RedisConnection) -> list[str]:
    """What is inconsistent in the reference index (see the module docstring); [] if none."""
    k = conn.keys
    problems: list[str] = []
    expected: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    versions: dict[str, set[int]] = collections.defaultdict(set)
    for name in await conn.scan_keys(f"{k.prefix}:{{*}}:m:*"):
        raw = await conn.run(lambda c, n=name: c.get(n))
        if raw is None:
            continue
        m = Manifest.from_json(raw)
        versions[k.versions(m.namespace_slot, m.cache_id)].add(m.version)
        for c in m.chunk_keys:
            expected[k.refs(c)][m.storage_class] += 1
    for name in await conn.scan_keys(f"{k.prefix}:{{*}}:r:*"):
        text = name.decode()
        got = await conn.run(lambda c, n=text: c.hgetall(n))
        counts = collections.Counter({f.decode(): int(v) for f, v in got.items() if int(v)})
        want = expected.pop(text, collections.Counter())
        if counts != want:
            problems.append(f"{text}: references {dict(counts)}, manifests list it {dict(want)}")
    problems.extend(
        f"{n}: listed by manifests {dict(c)}, no reference" for n, c in expected.items()
    )
    for name in await conn.scan_keys(f"{k.prefix}:{{*}}:v:*"):
        text = name.decode()
        members = await conn.run(lambda c, n=text: c.zrange(n, 0, -1))
        stored = {int(v) for v in members}
        if stored != versions.pop(text, set()):
            problems.append(f"{text}: versions {sorted(stored)} without exactly their manifests")
    problems.extend(f"{n}: manifests {sorted(v)} missing from the version set"
                    for n, v in versions.items())  # fmt: skip
    for name in await conn.scan_keys(f"{k.prefix}:{{*}}:z"):
        text = name.decode()
        slot = text.split("{", 1)[1].split("}", 1)[0]
        for member in await conn.run(lambda c, n=text: c.zrange(n, 0, -1)):
            ref = f"{k.prefix}:{{{slot}}}:r:{member.decode()}"
            if await conn.run(lambda c, n=ref: c.exists(n)):
                problems.append(f"GC candidate {member.decode()[:16]} still has references")
    return problems


async def test_master_killed_mid_load(tmp_path: Path) -> None:
    with redis_cluster(tmp_path / "cluster") as rc:
        conn = RedisConnection(rc.url, cluster=True, prefix=f"kvfo-{os.getpid()}")
        store = TieredStore([RedisTier(conn)], RedisRefIndex(conn), encrypted=False)
        await store.open()
        try:
            writers = tenants_on_every_master(rc, conn)
            await run_until(
                store,
                writers,
                lambda: all(w.rounds_ok >= ROUNDS_BEFORE_KILL for w in writers),
                "the load before the kill",
            )
            victim = rc.master_of(conn.keys.counter(writers[0].slot))
            replica = rc.replica_of(victim)
            before = {w.slot: w.rounds_ok for w in writers}
            failover_done = asyncio.Event()
            killed_at: list[float] = []

            async def kill_and_wait() -> None:
                await asyncio.sleep(0.3)  # mid-load: the writers are running
                rc.kill(victim.port)
                killed_at.append(time.monotonic())
                await asyncio.to_thread(rc.wait_failover, victim, replica)
                failover_done.set()

            killer = asyncio.create_task(kill_and_wait())
            marks: dict[str, int] = {}
            firsts: dict[str, float] = {}  # first success after the failover, per writer
            ok_at = 0.0

            def recovered() -> bool:
                nonlocal ok_at
                if not failover_done.is_set():
                    return False
                if not marks:
                    ok_at = time.monotonic()
                    marks.update({w.slot: w.rounds_ok for w in writers})
                for w in writers:
                    if w.slot not in firsts and w.rounds_ok > marks[w.slot]:
                        firsts[w.slot] = w.last_ok
                return all(w.rounds_ok >= marks[w.slot] + ROUNDS_AFTER for w in writers)

            await run_until(store, writers, recovered, "every writer recovering")
            await killer
            report = {w.slot[:6]: dict(w.outcomes) for w in writers}
            lag = max(firsts.values()) - ok_at
            print(f"[failover] master {victim.port} -> {replica.port}; outcomes: {report}")
            print(
                f"[failover] cluster_state:ok {ok_at - killed_at[0]:.1f} s after the kill; every "
                f"writer served again {lag:.1f} s later"
            )
            assert all(marks[w.slot] >= before[w.slot] for w in writers)
            assert [u for w in writers for u in w.unclean] == []
            assert [x for w in writers for x in w.wrong] == []
            assert await index_consistency(conn) == []
        finally:
            await store.close()


IN_FLIGHT = 8


async def test_calls_in_flight_when_a_master_dies_open_the_breaker_once(tmp_path: Path) -> None:
    """``IN_FLIGHT`` calls blocked on a master (``BLPOP``) when it is SIGKILLed all fail, but
    they are one outage, not ``IN_FLIGHT`` failed probes: the breaker opens once, with its base
    delay. (Counting each one doubled the delay every time: 8 calls in flight kept every
    tenant's Redis calls refused for the 30 s cap, long after the replica had taken over.)"""
    # a long node timeout: no replica takes over (and serves a retried call) while they fail
    with redis_cluster(tmp_path / "cluster", node_timeout_ms=10_000) as rc:
        conn = RedisConnection(rc.url, cluster=True, prefix=f"kvfo-{os.getpid()}")
        try:
            name = conn.keys.counter("00000000")
            victim = rc.master_of(name)
            await conn.run(lambda c: c.ping())
            calls = [
                asyncio.create_task(conn.run(lambda c: c.blpop([name], timeout=1.5)))
                for _ in range(IN_FLIGHT)
            ]
            for _ in range(1000):  # until every call is blocked on the master (a hang guard)
                if f"blocked_clients:{IN_FLIGHT}" in rc.cli_call(victim.port, "info", "clients"):
                    break
                await asyncio.sleep(0.02)
            rc.kill(victim.port)
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, TierUnavailable) for r in results), results
            breaker = conn.breaker
            assert breaker.state == "open"
            assert breaker.failures == 1, f"{breaker.failures} failures: {breaker.last_error}"
            assert breaker.seconds_until_retry() <= breaker.base_delay
        finally:
            await conn.close()


async def test_readiness_follows_the_cluster_after_the_node_in_its_url_died(tmp_path: Path) -> None:
    """The gateway's Redis readiness probe keeps one cluster client: with ``KVAAS_REDIS_URL``
    naming a master that is then SIGKILLed, ``/readyz`` reports Redis up again once its replica
    took over. (A client built per probe from that one URL could not connect at all.)"""
    with redis_cluster(tmp_path / "cluster") as rc:
        entry = rc.live_masters()[0]
        replica = rc.replica_of(entry)
        values = {
            "admin_token": ADMIN_TOKEN,
            "data_dir": tmp_path / "data",
            "redis_url": f"redis://127.0.0.1:{entry.port}/0",
            "redis_cluster": True,
            "redis_prefix": f"kvready-{os.getpid()}",
        }
        async with running_app(**values) as (_, client):
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            r = await client.get("/readyz", headers=admin)
            assert r.json()["components"]["redis"]["status"] == "ok", r.text
            rc.kill(entry.port)
            await asyncio.to_thread(rc.wait_failover, entry, replica)
            deadline = time.monotonic() + RECOVERY_LIMIT_S
            while True:
                r = await client.get("/readyz", headers=admin)
                redis_up = r.json()["components"]["redis"]
                if redis_up["status"] == "ok":
                    break
                assert time.monotonic() < deadline, f"Redis still reported down: {redis_up}"
                await asyncio.sleep(0.5)
