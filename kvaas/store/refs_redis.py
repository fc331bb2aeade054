"""Reference index in Redis (standalone or Cluster), shared by every engine node.

Each mutation is **one Lua script call** whose keys all carry the namespace slot of one tenant,
so it runs atomically on one Redis Cluster slot (see :mod:`kvaas.store.redis_conn` for the key
layout). The protocol is the one documented in :mod:`kvaas.store.refs`, with the same semantics
as :class:`~kvaas.store.refs_sqlite.SqliteRefIndex`:

- ``put_manifest`` stores the manifest JSON, adds the version to the cache's version set, takes
  one reference per chunk (a hash ``hot``/``standard``/``cold`` → count), removes the chunks from
  the GC candidates and reports the chunks that carry a tombstone. Storing an identical manifest
  again changes nothing; a different one raises :class:`ManifestConflict`.
- ``delete_manifest`` / ``set_storage_class`` read the manifest, then run a script that first
  checks the manifest is still the one read (optimistic concurrency: if another client changed
  it in between, the call is retried), so the script knows every key it touches up front (Redis
  Cluster wants keys declared, not computed inside the script).
- Released chunks whose counts all reach zero enter the slot's candidate zset with the server's
  time (``TIME``); collectors compare against the same clock.
- Tombstones are ``SET ... PX lease`` values holding the claim token: they expire by themselves
  when a collector dies. Claimed chunks stay in the candidate zset until ``finish_claim``, so a
  collector that dies between claim and delete orphans nothing; the claim script answers the
  chunks its token already holds, so a resent script (redis-py retries once after a socket
  timeout) claims the same chunks.
- Collectors visit the slots with candidates round-robin (a cursor per index) and take an equal
  share of the batch from each, so every tenant's garbage is collected at the same pace.
- Index scripts carry the ``allow-oom`` flag (Redis >= 7): at ``maxmemory`` chunk writes are
  refused (``standard`` spills to disk) while manifests and releases still commit.
- The server must never evict index keys: :meth:`RedisRefIndex.open` refuses to run on a Redis
  whose ``maxmemory-policy`` is not ``noeviction`` (see :func:`check_eviction_policy`).

``<prefix>:gc-slots`` (a set of slots that may have candidates) lives in another slot, so it is
updated with a separate command after the script: ``SADD`` after a release, and a collector
that finds a slot empty does ``SREM`` then re-checks the zset and re-adds the slot if a release
raced in, so a slot with candidates is never forgotten.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import time
from collections.abc import Sequence
from typing import Any, cast

from redis.exceptions import NoScriptError

from kvaas.redact import redact_url
from kvaas.store.errors import (
    ConfigurationError,
    ManifestConflict,
    ManifestNotFound,
    StoreError,
    TierUnavailable,
)
from kvaas.store.keys import SLOT_BYTES, ChunkKey
from kvaas.store.manifest import Manifest
from kvaas.store.policy import STORAGE_CLASSES, StorageClass, check_storage_class
from kvaas.store.redis_conn import RedisClient, RedisConnection, group_by_slot
from kvaas.store.refs import GarbageClaim, RefCounts, RefIndex, new_claim_token
from kvaas.store.refs_redis_scripts import (
    ABANDON,
    ALLOW_OOM,
    CLAIM,
    DELETE_MANIFEST,
    FINISH,
    PUT_MANIFEST,
    SET_CLASS,
)
from kvaas.store.tier import TierHealth

_MAX_RETRIES = 20
SAFE_EVICTION_POLICIES = frozenset({"noeviction"})
"""The only ``maxmemory-policy`` under which the index is safe (see
:meth:`RedisRefIndex.check_eviction_policy`)."""


def _is_per_node(info: Any) -> bool:
    """Whether an ``INFO`` reply of a cluster client is a dict per node."""
    return isinstance(info, dict) and bool(info) and all(isinstance(v, dict) for v in info.values())


async def _zrange(c: RedisClient, *, name: str, stop: int = -1) -> list[bytes]:
    """Members ``0..stop`` (inclusive; -1: all) of the sorted set ``name``, lowest score first."""
    return cast(list[bytes], await c.zrange(name, 0, stop, withscores=False))


class _Script:
    """A Lua script run with ``EVALSHA`` (falling back to ``EVAL`` on ``NOSCRIPT``)."""

    def __init__(self, source: str) -> None:
        source = ALLOW_OOM + source.lstrip("\n")
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: RedisClient, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


class RedisRefIndex(RefIndex):
    """Manifests and chunk reference counts in Redis through a shared :class:`RedisConnection`.

    Calls fail fast with :class:`~kvaas.store.errors.TierUnavailable` while Redis is down (the
    connection's circuit breaker), like the Redis tier.
    """

    def __init__(self, conn: RedisConnection) -> None:
        self.name = "index"
        self.conn = conn
        self.keys = conn.keys
        self._put = _Script(PUT_MANIFEST)
        self._delete = _Script(DELETE_MANIFEST)
        self._set_class = _Script(SET_CLASS)
        self._claim = _Script(CLAIM)
        self._finish = _Script(FINISH)
        self._abandon = _Script(ABANDON)
        self._mark = _Script("return redis.call('SADD', KEYS[1], ARGV[1])")
        self.policy_checked = False
        """Whether the server's eviction policy was checked (and found safe)."""
        self._gc_cursor = ""
        """The last slot a claim visited: the next claim starts after it (round-robin)."""

    async def open(self) -> None:
        """Refuse a Redis that may evict index keys (see :meth:`check_eviction_policy`). A
        Redis that is down now is checked by the first maintenance pass that reaches it."""
        try:
            await self.check_eviction_policy()
        except TierUnavailable:
            return

    async def check_eviction_policy(self) -> str:
        """The server's ``maxmemory-policy``; raise :class:`ConfigurationError` unless it is
        ``noeviction``.

        Reference counts, manifests and GC tombstones live in this Redis: an ``allkeys-*``
        policy may evict a reference count or a manifest (GC then deletes live chunks), a
        ``volatile-*`` policy may evict a tombstone (the lease of a collector) or the only copy of
        a chunk written with a TTL. With ``noeviction`` a full Redis answers writes with an
        out-of-memory error, which the store turns into a spill to disk or ``StorageFull``.
        """
        info = await self.conn.run(lambda c: c.info("memory"))
        nodes = info.values() if self.conn.cluster and _is_per_node(info) else [info]
        for node in nodes:
            policy = node.get("maxmemory_policy", "noeviction")
            policy = policy.decode() if isinstance(policy, bytes) else str(policy)
            if policy not in SAFE_EVICTION_POLICIES:
                raise ConfigurationError(
                    f"Redis at {redact_url(self.conn.url)} has maxmemory-policy {policy!r}: it "
                    "may evict KVaaS's reference counts, manifests or GC tombstones, and garbage "
                    "collection would then delete chunks that caches still use. Set "
                    "'maxmemory-policy noeviction' (with a maxmemory budget) on this server; "
                    "idle chunks move to disk by the store's own demotion."
                )
        self.policy_checked = True
        return "noeviction"

    async def _eval(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        nbytes = sum(len(a) for a in args if isinstance(a, bytes | str))
        return await self.conn.run(lambda c: script(c, keys, args), nbytes=nbytes)

    # -- manifests ---------------------------------------------------------------------------
    async def put_manifest(self, manifest: Manifest) -> list[ChunkKey]:
        m = manifest
        k = self.keys
        slot = m.namespace_slot
        keys = [
            k.manifest(slot, m.cache_id, m.version),
            k.versions(slot, m.cache_id),
            k.garbage(slot),
            *(k.refs(c) for c in m.chunk_keys),
            *(k.tombstone(c) for c in m.chunk_keys),
        ]
        args = [m.to_json(), m.storage_class, m.version, *(c.hex() for c in m.chunk_keys)]
        reply = await self._eval(self._put, keys, args)
        if int(reply[0]) == -1:
            raise ManifestConflict(
                f"cache {m.cache_id!r} version {m.version} already has a different manifest"
            )
        return [m.chunk_keys[int(i) - 1] for i in reply[1:]]

    async def get_manifest(self, slot: str, cache_id: str, version: int) -> Manifest | None:
        raw = await self._get_raw(slot, cache_id, version)
        return None if raw is None else Manifest.from_json(raw)

    async def _get_raw(self, slot: str, cache_id: str, version: int) -> bytes | None:
        name = self.keys.manifest(slot, cache_id, version)
        raw = await self.conn.run(lambda c: c.get(name))
        return raw.encode() if isinstance(raw, str) else raw

    async def list_versions(self, slot: str, cache_id: str) -> list[int]:
        name = self.keys.versions(slot, cache_id)
        members = await self.conn.run(functools.partial(_zrange, name=name))
        return sorted(int(v) for v in members)

    async def delete_manifest(self, slot: str, cache_id: str, version: int) -> Manifest | None:
        k = self.keys
        for _ in range(_MAX_RETRIES):
            raw = await self._get_raw(slot, cache_id, version)
            if raw is None:
                return None
            m = Manifest.from_json(raw)
            keys = [
                k.manifest(slot, cache_id, version),
                k.versions(slot, cache_id),
                k.garbage(slot),
                *(k.refs(c) for c in m.chunk_keys),
            ]
            args = [raw, m.storage_class, version, *(c.hex() for c in m.chunk_keys)]
            reply = int(await self._eval(self._delete, keys, args))
            if reply == 0:
                return None
            if reply > 0:
                if reply > 1:  # candidates were added: let collectors find this slot
                    await self._mark_slot(slot)
                return m
        raise StoreError(f"manifest of cache {cache_id!r} version {version} keeps changing")

    async def set_storage_class(
        self, slot: str, cache_id: str, version: int, storage_class: StorageClass
    ) -> tuple[Manifest, list[RefCounts]]:
        check_storage_class(storage_class)
        k = self.keys
        for _ in range(_MAX_RETRIES):
            raw = await self._get_raw(slot, cache_id, version)
            if raw is None:
                raise ManifestNotFound(f"no manifest for cache {cache_id!r} version {version}")
            old = Manifest.from_json(raw)
            new = old.with_storage_class(storage_class)
            keys = [k.manifest(slot, cache_id, version), *(k.refs(c) for c in old.chunk_keys)]
            args = [raw, new.to_json(), old.storage_class, new.storage_class]
            reply = await self._eval(self._set_class, keys, args)
            if reply == 0:
                raise ManifestNotFound(f"no manifest for cache {cache_id!r} version {version}")
            if reply == -1:
                continue
            flat = [int(v) for v in reply]
            counts = [RefCounts(*flat[i : i + 3]) for i in range(0, len(flat), 3)]
            return new, counts
        raise StoreError(f"manifest of cache {cache_id!r} version {version} keeps changing")

    async def ref_counts(self, keys: Sequence[ChunkKey]) -> list[RefCounts]:
        if not keys:
            return []
        names = [self.keys.refs(c) for c in keys]

        def build(pipe: Any) -> None:
            for n in names:
                pipe.hmget(n, *STORAGE_CLASSES)

        replies = await self.conn.pipelined(build)
        return [RefCounts(*(int(v or 0) for v in r)) for r in replies]

    async def tombstoned(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        names = [self.keys.tombstone(c) for c in keys]

        def build(pipe: Any) -> None:
            for n in names:
                pipe.exists(n)

        return [bool(r) for r in await self.conn.pipelined(build)]

    # -- garbage collection ------------------------------------------------------------------
    async def _mark_slot(self, slot: str) -> None:
        await self._eval(self._mark, [self.keys.gc_slots()], [slot])  # works at maxmemory too

    async def claim_garbage(
        self, *, grace_s: float, limit: int, lease_s: float, token: str | None = None
    ) -> GarbageClaim:
        """Claim up to ``limit`` candidates, fairly across tenants: slots are visited
        round-robin from where the previous pass of this index stopped, each taking at most an
        equal share of ``limit``, so a tenant with a large backlog cannot starve the others."""
        token = token or new_claim_token()
        started = time.monotonic()
        gc_slots = self.keys.gc_slots()
        raw_slots = await self.conn.run(lambda c: c.smembers(gc_slots))
        slots = sorted(
            s
            for s in ((r.decode() if isinstance(r, bytes) else str(r)) for r in raw_slots)
            if len(s) == 2 * SLOT_BYTES
        )
        claimed: list[ChunkKey] = []
        claimed_at = 0.0
        if not slots or limit <= 0:
            return GarbageClaim(token=token, keys=(), deadline=started + lease_s)
        at = bisect.bisect_right(slots, self._gc_cursor)
        order = slots[at:] + slots[:at]
        share = max(1, -(-limit // len(order)))
        for slot in order:
            want = min(share, limit - len(claimed))
            if want <= 0:
                break
            self._gc_cursor = slot
            zname = self.keys.garbage(slot)
            # a few more than wanted: candidates claimed by another live collector are skipped
            members: list[bytes] = await self.conn.run(
                functools.partial(_zrange, name=zname, stop=2 * want - 1)
            )
            if not members:
                await self._forget_slot_if_empty(slot)
                continue
            candidates = [ChunkKey(bytes.fromhex(m.decode())) for m in members]
            names, args = self.claim_call(
                slot, candidates, token, lease_s=lease_s, grace_s=grace_s, most=want
            )
            reply = await self._eval(self._claim, names, args)
            # the earliest script time: a candidate released again after it stays (at worst a
            # chunk is deleted twice, never a later copy left without a candidate)
            t = float(reply[0])
            claimed_at = t if not claimed_at else min(claimed_at, t)
            claimed.extend(candidates[int(i) - 1] for i in reply[1:])
        return GarbageClaim(
            token=token, keys=tuple(claimed), deadline=started + lease_s, claimed_at=claimed_at
        )

    def claim_call(
        self,
        slot: str,
        candidates: Sequence[ChunkKey],
        token: str,
        *,
        lease_s: float,
        grace_s: float,
        most: int | None = None,
    ) -> tuple[list[str], list[Any]]:
        """Key names and arguments of one claim script call on ``slot``'s ``candidates``."""
        names = [
            self.keys.garbage(slot),
            *(self.keys.refs(c) for c in candidates),
            *(self.keys.tombstone(c) for c in candidates),
        ]
        args: list[Any] = [
            token,
            max(1, int(lease_s * 1000)),
            repr(float(grace_s)),
            len(candidates) if most is None else most,
            *(c.hex() for c in candidates),
        ]
        return names, args

    async def _forget_slot_if_empty(self, slot: str) -> None:
        gc_slots = self.keys.gc_slots()
        zname = self.keys.garbage(slot)
        await self.conn.run(lambda c: c.srem(gc_slots, slot))
        if await self.conn.run(lambda c: c.zcard(zname)):  # a release raced in: keep the slot
            await self._mark_slot(slot)

    async def finish_claim(self, claim: GarbageClaim) -> None:
        for slot, positions in group_by_slot(claim.keys).items():
            chunks = [claim.keys[i] for i in positions]
            names = [
                self.keys.garbage(slot),
                *(self.keys.refs(c) for c in chunks),
                *(self.keys.tombstone(c) for c in chunks),
            ]
            args = [claim.token, repr(claim.claimed_at), *(c.hex() for c in chunks)]
            await self._eval(self._finish, names, args)

    async def abandon_claim(self, claim: GarbageClaim) -> None:
        await self._requeue(claim.keys, claim.token)

    async def requeue_unreferenced(self, keys: Sequence[ChunkKey]) -> int:
        return await self._requeue(list(dict.fromkeys(keys)), "")

    async def _requeue(self, keys: Sequence[ChunkKey], token: str) -> int:
        total = 0
        for slot, positions in group_by_slot(keys).items():
            chunks = [keys[i] for i in positions]
            names = [
                self.keys.garbage(slot),
                *(self.keys.refs(c) for c in chunks),
                *(self.keys.tombstone(c) for c in chunks),
            ]
            args = [token, *(c.hex() for c in chunks)]
            added = int(await self._eval(self._abandon, names, args))
            if added:
                await self._mark_slot(slot)
            total += added
        return total

    async def health(self) -> TierHealth:
        h = await self.conn.ping()
        if h.status == "ok":
            return TierHealth("ok", f"Redis index ({h.detail})")
        return h

    async def close(self) -> None:
        await self.conn.close()
