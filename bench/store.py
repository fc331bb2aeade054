"""KV store benchmark: tier throughput and latency against raw baselines, prefix lookups at
10k vs 1M stored keys, and batched vs one-by-one prefix fetches.

What is measured (all in one run, on the same bytes):

- **Tier put/get** for 256 KB, 1 MB and 4 MB blobs (valid codec containers around random
  bytes), *single* (one chunk per call) and *batched* (16 MB per call): MB/s, p50/p99 latency per
  call, next to a **raw baseline** of the same operations: plain redis-py ``SET``/``GET``
  (pipelined ``SET`` / ``MGET`` when batched) for the Redis tier; plain ``open/write/fsync`` and
  ``open/read`` files (one thread hop per call, as the tier does) for the durable disk tier. The
  memory tier has no baseline; its row is followed by ``store get`` (``TieredStore.get_prefix``
  from memory, checksums verified), the number a reader sees. Reads after writes come from the
  page cache for both the tier and the baseline.
- **Prefix lookup**: ``TieredStore.longest_prefix`` of a 128-chunk prefix with 10k vs 1M keys
  stored in the tier (disk: 10k vs 100k files, ``--quick``: 10k vs 30k), median time and the
  number of calls each tier received per lookup (one round trip each).
- **Prefix fetch**: ``get_prefix`` of 128 codec-encoded int4 chunks (random bf16 KV, 8 layers,
  2 KV heads, head_dim 64, 256 tokens) in one batched call vs 128 one-chunk calls.
- **Encryption at rest**: ``put_chunks`` and ``get_prefix`` of those 128 chunks through a store
  with encryption off and one with it on (AES-256-GCM, :mod:`kvaas.store.crypto`) over the same
  tier, alternating, MB/s of codec bytes and the on/off ratio. The other sections measure
  plaintext stores, to compare with their raw baselines.

Redis is the standalone server at ``KVAAS_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``);
keys go under a random prefix and are deleted afterwards.

    python bench/store.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import torch
from prometheus_client import REGISTRY
from rich.console import Console
from rich.table import Table

from kvaas import codec
from kvaas.codec.container import pack
from kvaas.store import (
    ChunkKey,
    ChunkSealer,
    DiskTier,
    MasterKeys,
    MemoryTier,
    RedisConnection,
    RedisTier,
    SqliteRefIndex,
    Tier,
    TieredStore,
    chunk_keys,
    derive_namespace,
)

MB = 1 << 20
SIZES = {"256 KB": 256 * 1024, "1 MB": MB, "4 MB": 4 * MB}
BATCH_BYTES = 16 * MB
PREFIX_CHUNKS = 128
REDIS_URL = os.environ.get("KVAAS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


# -- data ----------------------------------------------------------------------------------------
def container(size: int) -> bytes:
    """A valid codec container of exactly ``size`` bytes around random payload bytes."""
    return pack(codec.scheme_id("none"), torch.Size([1, 2, 1, 1, 1]), torch.bfloat16, {},
                os.urandom(size - 36))  # fmt: skip


def realistic_chunk(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn((8, 2, 256, 2, 64), generator=g).to(torch.bfloat16)
    return codec.encode(kv, "int4")


class Keys:
    """Fresh chunk keys of one namespace (each call returns new ones)."""

    def __init__(self) -> None:
        self.namespace = derive_namespace(secrets.token_bytes(32))
        self.n = 0

    def take(self, count: int) -> list[ChunkKey]:
        tokens = list(range(self.n * 16, (self.n + count) * 16))
        self.n += count
        return chunk_keys(tokens, namespace=self.namespace, model_fingerprint="bench",
                          scheme_id="none", chunk_tokens=16)  # fmt: skip


def pct(samples: Sequence[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def timed(calls: Sequence[Callable[[], Awaitable[Any]]]) -> tuple[float, list[float]]:
    lat: list[float] = []
    t0 = time.perf_counter()
    for call in calls:
        s = time.perf_counter()
        await call()
        lat.append(time.perf_counter() - s)
    return time.perf_counter() - t0, lat


def row(tier: str, size: str, mode: str, op: str, nbytes: int, total: float,
        lat: list[float], base: tuple[float, list[float]] | None) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {
        "tier": tier, "size": size, "mode": mode, "op": op,
        "mb_s": nbytes / MB / total, "p50_ms": 1e3 * pct(lat, 0.5), "p99_ms": 1e3 * pct(lat, 0.99),
        "raw_mb_s": None, "raw_p50_ms": None, "ratio": None,
    }  # fmt: skip
    if base is not None:
        out["raw_mb_s"] = nbytes / MB / base[0]
        out["raw_p50_ms"] = 1e3 * pct(base[1], 0.5)
        out["ratio"] = out["mb_s"] / out["raw_mb_s"]
    return out


# -- raw baselines -------------------------------------------------------------------------------
class RawRedis:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.c = client
        self.prefix = prefix

    def name(self, k: ChunkKey) -> str:
        return f"{self.prefix}:raw:{k.hex()}"

    async def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> None:
        if len(items) == 1:
            await self.c.set(self.name(items[0][0]), items[0][1])
            return
        pipe = self.c.pipeline(transaction=False)
        for k, b in items:
            pipe.set(self.name(k), b)
        await pipe.execute()

    async def get(self, keys: Sequence[ChunkKey]) -> None:
        if len(keys) == 1:
            await self.c.get(self.name(keys[0]))
        else:
            await self.c.mget([self.name(k) for k in keys])

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        await self.c.delete(*(self.name(k) for k in keys))


class RawFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> None:
        for k, b in items:
            fd = os.open(self.root / k.hex(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _get(self, keys: Sequence[ChunkKey]) -> list[bytes]:
        out = []  # kept, like a reader (and the tier) has to
        for k in keys:
            with open(self.root / k.hex(), "rb", buffering=0) as f:
                out.append(f.readall())
        return out

    async def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> None:
        await asyncio.to_thread(self._put, items)

    async def get(self, keys: Sequence[ChunkKey]) -> None:
        await asyncio.to_thread(self._get, keys)

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        for k in keys:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / k.hex())


# -- throughput ----------------------------------------------------------------------------------
async def bench_tier(
    name: str, tier: Tier, raw: RawRedis | RawFiles | None, keys: Keys, per_cell: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for label, size in SIZES.items():
        pool = [container(size) for _ in range(4)]
        for mode in ("single", "batched"):
            per_call = 1 if mode == "single" else max(1, BATCH_BYTES // size)
            n_calls = max(8 if mode == "batched" else 16, per_cell // (size * per_call))
            ks = keys.take(n_calls * per_call)
            items = [(k, pool[i % len(pool)]) for i, k in enumerate(ks)]
            batches = [items[i : i + per_call] for i in range(0, len(items), per_call)]
            nbytes = size * len(items)
            base_put = base_get = None
            if raw is not None:  # interleave: baseline first, then the tier, same bytes
                base_put = await timed([lambda b=b: raw.put(b) for b in batches])
                base_get = await timed([lambda b=b: raw.get([k for k, _ in b]) for b in batches])
                await raw.delete(ks)
            put = await timed([lambda b=b: tier.put_many(b) for b in batches])
            get = await timed([lambda b=b: tier.get_many([k for k, _ in b]) for b in batches])
            rows.append(row(name, label, mode, "put", nbytes, *put, base_put))
            rows.append(row(name, label, mode, "get", nbytes, *get, base_get))
            if isinstance(tier, MemoryTier):  # what a reader sees: get_prefix with checksums
                store = TieredStore([tier], SqliteRefIndex(Path(":memory:")), encrypted=False)
                sget = await timed(
                    [lambda b=b, s=store: s.get_prefix([k for k, _ in b]) for b in batches]
                )
                rows.append(row(name, label, mode, "store get", nbytes, *sget, None))
                await store.refs.close()
            await tier.delete_many(ks)
    return rows


# -- prefix lookups ------------------------------------------------------------------------------
_FILL = """
local pre = ARGV[1]
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  redis.call('SET', pre .. string.format('%056d', i), 'x')
end
return 0
"""
_UNFILL = """
local pre = ARGV[1]
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  redis.call('UNLINK', pre .. string.format('%056d', i))
end
return 0
"""


def calls_of(tier: str, op: str) -> float:
    return REGISTRY.get_sample_value("kvaas_store_op_seconds_count", {"tier": tier, "op": op}) or 0


async def lookup_time(store: TieredStore, keys: list[ChunkKey], reps: int) -> tuple[float, float]:
    """Median seconds of ``longest_prefix`` and calls per lookup received by the first tier."""
    await store.longest_prefix(keys)  # warm-up
    before = calls_of(store.tiers[0].name, "exists")
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        n = await store.longest_prefix(keys)
        samples.append(time.perf_counter() - t0)
        assert n == len(keys), n
    per = (calls_of(store.tiers[0].name, "exists") - before) / reps
    return statistics.median(samples), per


async def bench_lookup(
    kind: str, counts: tuple[int, int], tmp: Path, client: aioredis.Redis, prefix: str
) -> list[dict[str, Any]]:
    keys = Keys()
    prefix_keys = keys.take(PREFIX_CHUNKS)
    tiny = container(64)
    rows = []
    refs = SqliteRefIndex(Path(":memory:"))
    tier = one_tier(kind, tmp / "lookup", 1 << 40, prefix)
    store = TieredStore([tier], refs)
    await store.open()
    await tier.put_many([(k, tiny) for k in prefix_keys])
    stored = PREFIX_CHUNKS
    tag = prefix_keys[0][:4].hex()
    try:
        for target in counts:
            fill = target - stored
            if kind == "memory":
                assert isinstance(tier, MemoryTier)
                for i in range(fill):  # same blob object: only the dict grows
                    tier._data[ChunkKey(i.to_bytes(32, "little"))] = tiny
            elif kind == "redis":
                pre = f"{prefix}:{{{tag}}}:c:{tag}"
                for lo in range(stored, target, 100_000):
                    hi = min(target, lo + 100_000) - 1
                    await client.eval(_FILL, 0, pre, lo, hi)
            else:
                await asyncio.to_thread(fill_files, tmp / "lookup", stored, target)
            stored = target
            t, per = await lookup_time(store, prefix_keys, 50)
            rows.append({"tier": kind, "stored_keys": target, "lookup_ms": 1e3 * t,
                         "calls_per_lookup": per})  # fmt: skip
        rows[-1]["ratio_to_smallest"] = rows[-1]["lookup_ms"] / rows[0]["lookup_ms"]
    finally:
        if kind == "redis":
            pre = f"{prefix}:{{{tag}}}:c:{tag}"
            for lo in range(PREFIX_CHUNKS, stored, 100_000):
                await client.eval(_UNFILL, 0, pre, lo, min(stored, lo + 100_000) - 1)
            await tier.delete_many(prefix_keys)
        await store.close()
    return rows


def fill_files(root: Path, start: int, end: int) -> None:
    """Filler chunk files written directly (sharded like the tier's own)."""
    for i in range(start, end):
        h = i.to_bytes(32, "little").hex()
        d = root / h[:2] / h[2:4]
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / h, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)


def one_tier(kind: str, disk_dir: Path, capacity: int, prefix: str) -> Tier:
    """The tier ``kind`` names (``memory``, ``redis`` or ``disk``, the disk one without fsync)
    for a single-tier store."""
    if kind == "memory":
        return MemoryTier(capacity)
    if kind == "redis":
        return RedisTier(RedisConnection(REDIS_URL, prefix=prefix))
    return DiskTier(disk_dir, capacity, durable=False)


# -- prefix fetch --------------------------------------------------------------------------------
async def bench_fetch(kind: str, tmp: Path, prefix: str, reps: int) -> dict[str, Any]:
    keys = Keys().take(PREFIX_CHUNKS)
    blobs = [realistic_chunk(i % 8) for i in range(PREFIX_CHUNKS)]
    tier = one_tier(kind, tmp / "fetch", 1 << 34, prefix)
    store = TieredStore([tier], SqliteRefIndex(Path(":memory:")), encrypted=False)
    await store.open()
    try:
        await tier.put_many(list(zip(keys, blobs, strict=True)))

        async def batched() -> None:
            assert len(await store.get_prefix(keys)) == PREFIX_CHUNKS

        async def one_by_one() -> None:
            for k in keys:
                assert len(await store.get_prefix([k])) == 1

        b_samples, s_samples = [], []
        await batched()
        for _ in range(reps):  # side by side, alternating
            b_samples.append((await timed([batched]))[0])
            s_samples.append((await timed([one_by_one]))[0])
        b, s = statistics.median(b_samples), statistics.median(s_samples)
        nbytes = sum(map(len, blobs))
        return {"tier": kind, "chunks": PREFIX_CHUNKS, "chunk_kb": nbytes / PREFIX_CHUNKS / 1024,
                "batched_ms": 1e3 * b, "one_by_one_ms": 1e3 * s, "speedup": s / b,
                "batched_mb_s": nbytes / MB / b}  # fmt: skip
    finally:
        await tier.delete_many(keys)
        await store.close()


# -- encryption at rest --------------------------------------------------------------------------
async def bench_encryption(kind: str, tmp: Path, prefix: str, reps: int) -> dict[str, Any]:
    """Medians of ``put_chunks`` and ``get_prefix`` of a 128-chunk prefix, encryption off and on,
    over one tier (the disk tier without fsync, like the prefix fetch)."""
    keys = Keys()
    blobs = [realistic_chunk(i % 8) for i in range(PREFIX_CHUNKS)]
    master = MasterKeys("k1", {"k1": os.urandom(32)})
    sealer = ChunkSealer(master.tenant_keys(keys.namespace), "bench", "int4")
    tier = one_tier(kind, tmp / "encryption", 1 << 34, prefix)
    stores = {on: TieredStore([tier], SqliteRefIndex(Path(":memory:")), encrypted=on)
              for on in (False, True)}  # fmt: skip
    for store in stores.values():
        await store.open()
    times: dict[tuple[bool, str], list[float]] = {
        (on, op): [] for on in stores for op in ("put", "get")
    }
    try:
        for rep in range(reps + 1):  # round 0 warms up
            for on, store in stores.items():
                ks = keys.take(PREFIX_CHUNKS)
                s = sealer if on else None
                t0 = time.perf_counter()
                await store.put_chunks(list(zip(ks, blobs, strict=True)), "hot", s)
                t1 = time.perf_counter()
                assert await store.get_prefix(ks, s) == blobs
                t2 = time.perf_counter()
                await tier.delete_many(ks)
                if rep:
                    times[on, "put"].append(t1 - t0)
                    times[on, "get"].append(t2 - t1)
    finally:
        await stores[False].refs.close()
        await stores[True].close()
    mb = sum(map(len, blobs)) / MB
    out: dict[str, Any] = {
        "tier": kind, "chunks": PREFIX_CHUNKS, "chunk_kb": mb * 1024 / PREFIX_CHUNKS
    }  # fmt: skip
    for op in ("put", "get"):
        off_mb_s, on_mb_s = (mb / statistics.median(times[e, op]) for e in (False, True))
        out[f"{op}_off_mb_s"], out[f"{op}_on_mb_s"] = off_mb_s, on_mb_s
        out[f"{op}_ratio"] = on_mb_s / off_mb_s
    return out


# -- main ----------------------------------------------------------------------------------------
def fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="kvaas-bench-store-"))
    prefix = f"bench-{secrets.token_hex(4)}"
    client = aioredis.Redis.from_url(REDIS_URL)
    per_cell = (32 if args.quick else 128) * MB
    result: dict[str, Any] = {"quick": args.quick, "redis_url": REDIS_URL}
    try:
        await client.ping()
        keys = Keys()
        tiers: list[tuple[str, Tier, RawRedis | RawFiles | None]] = [
            ("memory", MemoryTier(1 << 40), None),
            (
                "redis",
                RedisTier(RedisConnection(REDIS_URL, prefix=prefix)),
                RawRedis(client, prefix),
            ),
            ("disk", DiskTier(tmp / "tier", 1 << 40), RawFiles(tmp / "raw")),
        ]
        rows: list[dict[str, Any]] = []
        for name, tier, raw in tiers:
            await tier.open()
            rows += await bench_tier(name, tier, raw, keys, per_cell)
            await tier.close()
        result["throughput"] = rows
        lookups: list[dict[str, Any]] = []
        lookups += await bench_lookup("memory", (10_000, 1_000_000), tmp, client, prefix)
        lookups += await bench_lookup("redis", (10_000, 1_000_000), tmp, client, prefix)
        disk_counts = (10_000, 30_000) if args.quick else (10_000, 100_000)
        lookups += await bench_lookup("disk", disk_counts, tmp, client, prefix)
        result["prefix_lookup"] = lookups
        reps = 3 if args.quick else 10
        result["prefix_fetch"] = [
            await bench_fetch(k, tmp, prefix, reps) for k in ("memory", "redis", "disk")
        ]
        result["encryption"] = [
            await bench_encryption(k, tmp, prefix, 2 * reps + 1)
            for k in ("memory", "redis", "disk")
        ]
    finally:
        async for name in client.scan_iter(match=f"{prefix}:*", count=1000):
            await client.unlink(name)  # counters and anything a failed step left behind
        await client.aclose()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def show(result: dict[str, Any]) -> None:
    console = Console(width=150)
    t = Table(title="Tier throughput vs raw baseline (same run, same bytes)")
    for c in ("tier", "blob", "mode", "op", "MB/s", "p50 ms", "p99 ms", "raw MB/s", "raw p50",
              "x raw"):  # fmt: skip
        t.add_column(c, justify="right" if c not in ("tier", "mode", "op") else "left")
    for r in result["throughput"]:
        t.add_row(r["tier"], r["size"], r["mode"], r["op"], fmt(r["mb_s"], ",.0f"),
                  fmt(r["p50_ms"], ".2f"), fmt(r["p99_ms"], ".2f"), fmt(r["raw_mb_s"], ",.0f"),
                  fmt(r["raw_p50_ms"], ".2f"), fmt(r["ratio"], ".2f"))  # fmt: skip
    console.print(t)
    t = Table(title=f"Prefix lookup ({PREFIX_CHUNKS} chunks, longest_prefix)")
    for c in ("tier", "stored keys", "median ms", "calls per tier", "x smallest"):
        t.add_column(c, justify="right" if c != "tier" else "left")
    for r in result["prefix_lookup"]:
        ratio = fmt(r.get("ratio_to_smallest"), ".2f")
        t.add_row(r["tier"], f"{r['stored_keys']:,}", fmt(r["lookup_ms"], ".3f"),
                  fmt(r["calls_per_lookup"], ".0f"), ratio)  # fmt: skip
    console.print(t)
    t = Table(title=f"Prefix fetch: {PREFIX_CHUNKS} codec int4 chunks, batched vs one by one")
    for c in ("tier", "chunk KB", "batched ms", "one-by-one ms", "speedup", "batched MB/s"):
        t.add_column(c, justify="right" if c != "tier" else "left")
    for r in result["prefix_fetch"]:
        t.add_row(r["tier"], fmt(r["chunk_kb"], ".0f"), fmt(r["batched_ms"], ".1f"),
                  fmt(r["one_by_one_ms"], ".1f"), fmt(r["speedup"], ".1f") + "x",
                  fmt(r["batched_mb_s"], ",.0f"))  # fmt: skip
    console.print(t)
    t = Table(title=f"Encryption at rest: {PREFIX_CHUNKS} codec int4 chunks, off vs on (AES-GCM)")
    for c in ("tier", "chunk KB", "put off MB/s", "put on MB/s", "put on/off", "get off MB/s",
              "get on MB/s", "get on/off"):  # fmt: skip
        t.add_column(c, justify="right" if c != "tier" else "left")
    for r in result["encryption"]:
        t.add_row(r["tier"], fmt(r["chunk_kb"], ".0f"), fmt(r["put_off_mb_s"], ",.0f"),
                  fmt(r["put_on_mb_s"], ",.0f"), fmt(r["put_ratio"], ".2f"),
                  fmt(r["get_off_mb_s"], ",.0f"), fmt(r["get_on_mb_s"], ",.0f"),
                  fmt(r["get_ratio"], ".2f"))  # fmt: skip
    console.print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (< 1 min)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = asyncio.run(run(args))
    result["seconds"] = time.perf_counter() - t0
    show(result)
    print(f"total {result['seconds']:.1f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
