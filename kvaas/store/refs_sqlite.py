"""Reference index in a SQLite file (embedded mode, no Redis).

Every mutation is one ``BEGIN IMMEDIATE`` transaction, so it is atomic with respect to every
other process using the same file (SQLite's file locks); WAL mode lets readers proceed while a
writer commits. Calls run in a worker thread (``asyncio.to_thread``) on one connection per
index, serialized by a lock.

A full disk: the index usually shares its filesystem with the disk tier, and releasing
references (deleting a manifest, finishing a GC claim) is what frees that disk, so a release
must still commit when the disk is full. A write that fails with ``SQLITE_FULL`` first
checkpoints and truncates the write-ahead log and retries; the index also keeps a *reserve
file* next to it (``<index>.reserve``, ``reserve_bytes``): a release that still fails deletes
the reserve and retries once more (after a checkpoint, which the freed room lets run). Other
writes (storing a manifest) do not touch the reserve and fail with
:class:`~kvaas.store.errors.StorageFull`. :meth:`SqliteRefIndex.restore_reserve` (run by the
store's maintenance) makes the reserve again once there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kvaas.store import metrics as store_metrics
from kvaas.store.errors import ManifestConflict, ManifestNotFound, StorageFull, StoreError
from kvaas.store.keys import ChunkKey
from kvaas.store.manifest import Manifest
from kvaas.store.policy import STORAGE_CLASSES, StorageClass
from kvaas.store.refs import GarbageClaim, RefCounts, RefIndex, new_claim_token
from kvaas.store.tier import TierHealth

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    slot TEXT NOT NULL, cache_id TEXT NOT NULL, version INTEGER NOT NULL,
    body BLOB NOT NULL, PRIMARY KEY (slot, cache_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refs (
    key BLOB NOT NULL, storage_class TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (key, storage_class)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS garbage (key BLOB PRIMARY KEY, since REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS garbage_since ON garbage (since);
CREATE TABLE IF NOT EXISTS tombstones (
    key BLOB PRIMARY KEY, token TEXT NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
"""
_BATCH = 500  # keys per IN (...) query, under SQLite's variable limit
log = logging.getLogger("kvaas.store")


def _is_full(e: sqlite3.Error) -> bool:
    """Whether ``e`` is SQLite's "database or disk is full" (``SQLITE_FULL``)."""
    code = getattr(e, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(e) or "No space" in str(e)


class SqliteRefIndex(RefIndex):
    """Manifests and reference counts in the SQLite file ``path``."""

    def __init__(
        self, path: Path, *, busy_timeout_s: float = 30.0, reserve_bytes: int = 8 << 20
    ) -> None:
        self.name = "index"
        self.path = Path(path)
        self.reserve_bytes = reserve_bytes if str(self.path) != ":memory:" else 0
        self.reserve_path = Path(f"{self.path}.reserve")
        if str(self.path) != ":memory:":  # readable by this user only: the file 0600 (and
            # so SQLite's -wal and -shm files, which take the database file's mode)
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            with contextlib.suppress(OSError):  # a file made before: tighten it
                if self.path.stat().st_mode & 0o777 != 0o600:
                    os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._make_reserve()

    # -- plumbing ----------------------------------------------------------------------------
    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._lock:
                try:
                    return fn(self._db)
                except sqlite3.Error as e:
                    raise StoreError(f"chunk index {self.path}: {e}") from e

        return await asyncio.to_thread(run)

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, release: bool = False) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction (rolled back on any error). A full
        disk raises :class:`StorageFull`; a ``release`` first gives up the reserve file and
        retries once (see the module docstring)."""

        def tx(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return out

        def run() -> T:
            with self._lock:
                try:
                    return tx(self._db)
                except sqlite3.Error as e:
                    if not _is_full(e):
                        raise StoreError(f"chunk index {self.path}: {e}") from e
                    first = e
                if self._truncate_wal():  # the write-ahead log's file is the first room to free
                    try:
                        return tx(self._db)
                    except sqlite3.Error as e:
                        if not _is_full(e):
                            raise StoreError(f"chunk index {self.path}: {e}") from e
                if not (release and self._drop_reserve()):
                    raise StorageFull(
                        "index", f"chunk index {self.path}: the disk is full ({first})"
                    ) from first
                self._truncate_wal()  # with the reserve's room the checkpoint can run now
                try:
                    return tx(self._db)
                except sqlite3.Error as e:
                    if _is_full(e):
                        raise StorageFull(
                            "index",
                            f"chunk index {self.path}: the disk is full even after giving up "
                            f"the {self.reserve_bytes}-byte reserve ({e})",
                        ) from e
                    raise StoreError(f"chunk index {self.path}: {e}") from e

        return await asyncio.to_thread(run)

    # -- the reserve file --------------------------------------------------------------------
    def _make_reserve(self) -> bool:
        """Create the reserve file (blocks really allocated) unless it exists; False when there
        is no room for it now."""
        if self.reserve_bytes <= 0 or self.reserve_path.exists():
            return True
        tmp = Path(f"{self.reserve_path}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.reserve_bytes)
                except (AttributeError, OSError) as e:
                    if getattr(e, "errno", None) == errno.ENOSPC:
                        raise
                    block = b"\0" * (1 << 16)
                    left = self.reserve_bytes
                    while left > 0:
                        left -= os.write(fd, block[: min(left, len(block))])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve_path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        return True

    def _truncate_wal(self) -> bool:
        """Checkpoint the write-ahead log into the database and truncate its file (caller holds
        the lock); True when the log is empty now."""
        try:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            return False
        return not busy

    def _drop_reserve(self) -> bool:
        """Delete the reserve file; True if there was one to free."""
        try:
            os.unlink(self.reserve_path)
        except OSError:
            return False
        store_metrics.INDEX_RESERVE_RELEASED.inc()
        log.warning(
            "chunk index %s: the disk is full; gave up the %d-byte reserve so that releases "
            "can commit",
            self.path,
            self.reserve_bytes,
        )
        return True

    async def restore_reserve(self) -> bool:
        """Checkpoint and truncate the write-ahead log, then make the reserve file again if it
        was given up and there is room; True when it is in place."""
        if str(self.path) == ":memory:":
            return True

        def run() -> bool:
            with self._lock:
                self._truncate_wal()
                return self._make_reserve()

        return await asyncio.to_thread(run)

    @staticmethod
    def _in(db: sqlite3.Connection, sql: str, keys: Sequence[bytes]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for i in range(0, len(keys), _BATCH):
            part = keys[i : i + _BATCH]
            marks = ",".join("?" * len(part))
            rows.extend(db.execute(sql.format(marks=marks), part).fetchall())
        return rows

    # -- manifests ---------------------------------------------------------------------------
    async def put_manifest(self, manifest: Manifest) -> list[ChunkKey]:
        body = manifest.to_json()
        m = manifest

        def tx(db: sqlite3.Connection) -> list[ChunkKey]:
            row = db.execute(
                "SELECT body FROM manifests WHERE slot=? AND cache_id=? AND version=?",
                (m.namespace_slot, m.cache_id, m.version),
            ).fetchone()
            if row is not None and bytes(row[0]) != body:
                raise ManifestConflict(
                    f"cache {m.cache_id!r} version {m.version} already has a different manifest"
                )
            if row is None:
                db.execute(
                    "INSERT INTO manifests (slot, cache_id, version, body) VALUES (?,?,?,?)",
                    (m.namespace_slot, m.cache_id, m.version, body),
                )
                db.executemany(
                    "INSERT INTO refs (key, storage_class, n) VALUES (?,?,1) "
                    "ON CONFLICT (key, storage_class) DO UPDATE SET n = n + 1",
                    [(k, m.storage_class) for k in m.chunk_keys],
                )
                db.executemany("DELETE FROM garbage WHERE key=?", [(k,) for k in m.chunk_keys])
            stoned = self._tombstoned_set(db, list(m.chunk_keys), time.time())
            return [k for k in m.chunk_keys if k in stoned]

        return await self._write(tx)

    def _tombstoned_set(
        self, db: sqlite3.Connection, keys: list[ChunkKey], now: float
    ) -> set[bytes]:
        rows = self._in(db, "SELECT key, expires FROM tombstones WHERE key IN ({marks})", keys)
        return {bytes(r[0]) for r in rows if r[1] > now}

    async def get_manifest(self, slot: str, cache_id: str, version: int) -> Manifest | None:
        row = await self._call(
            lambda db: db.execute(
                "SELECT body FROM manifests WHERE slot=? AND cache_id=? AND version=?",
                (slot, cache_id, version),
            ).fetchone()
        )
        return None if row is None else Manifest.from_json(bytes(row[0]))

    async def list_versions(self, slot: str, cache_id: str) -> list[int]:
        rows = await self._call(
            lambda db: db.execute(
                "SELECT version FROM manifests WHERE slot=? AND cache_id=? ORDER BY version",
                (slot, cache_id),
            ).fetchall()
        )
        return [int(r[0]) for r in rows]

    async def delete_manifest(self, slot: str, cache_id: str, version: int) -> Manifest | None:
        def tx(db: sqlite3.Connection) -> Manifest | None:
            row = db.execute(
                "SELECT body FROM manifests WHERE slot=? AND cache_id=? AND version=?",
                (slot, cache_id, version),
            ).fetchone()
            if row is None:
                return None
            m = Manifest.from_json(bytes(row[0]))
            db.execute(
                "DELETE FROM manifests WHERE slot=? AND cache_id=? AND version=?",
                (slot, cache_id, version),
            )
            self._release(db, m.chunk_keys, m.storage_class)
            return m

        return await self._write(tx, release=True)

    def _release(
        self, db: sqlite3.Connection, keys: Sequence[ChunkKey], storage_class: StorageClass
    ) -> None:
        self._decrement(db, keys, storage_class)
        unique = list(dict.fromkeys(keys))
        still = {
            bytes(r[0]) for r in self._in(db, "SELECT key FROM refs WHERE key IN ({marks})", unique)
        }
        now = time.time()
        db.executemany(
            "INSERT INTO garbage (key, since) VALUES (?,?) ON CONFLICT (key) DO NOTHING",
            [(k, now) for k in unique if k not in still],
        )

    @staticmethod
    def _decrement(
        db: sqlite3.Connection, keys: Sequence[ChunkKey], storage_class: StorageClass
    ) -> None:
        """Take one reference of ``storage_class`` off each key; drop rows that reach zero
        (by primary key: no table scan)."""
        rows = [(k, storage_class) for k in keys]
        db.executemany("UPDATE refs SET n = n - 1 WHERE key=? AND storage_class=?", rows)
        db.executemany("DELETE FROM refs WHERE key=? AND storage_class=? AND n <= 0", rows)

    async def set_storage_class(
        self, slot: str, cache_id: str, version: int, storage_class: StorageClass
    ) -> tuple[Manifest, list[RefCounts]]:
        def tx(db: sqlite3.Connection) -> tuple[Manifest, list[RefCounts]]:
            row = db.execute(
                "SELECT body FROM manifests WHERE slot=? AND cache_id=? AND version=?",
                (slot, cache_id, version),
            ).fetchone()
            if row is None:
                raise ManifestNotFound(f"no manifest for cache {cache_id!r} version {version}")
            old = Manifest.from_json(bytes(row[0]))
            new = old.with_storage_class(storage_class)
            if new.storage_class != old.storage_class:
                db.execute(
                    "UPDATE manifests SET body=? WHERE slot=? AND cache_id=? AND version=?",
                    (new.to_json(), slot, cache_id, version),
                )
                self._decrement(db, old.chunk_keys, old.storage_class)
                db.executemany(
                    "INSERT INTO refs (key, storage_class, n) VALUES (?,?,1) "
                    "ON CONFLICT (key, storage_class) DO UPDATE SET n = n + 1",
                    [(k, new.storage_class) for k in new.chunk_keys],
                )
            return new, self._counts(db, list(new.chunk_keys))

        return await self._write(tx)

    def _counts(self, db: sqlite3.Connection, keys: list[ChunkKey]) -> list[RefCounts]:
        per: dict[bytes, dict[str, int]] = {}
        for key, cls, n in self._in(
            db, "SELECT key, storage_class, n FROM refs WHERE key IN ({marks})", keys
        ):
            per.setdefault(bytes(key), {})[cls] = int(n)
        return [RefCounts(**{c: per.get(k, {}).get(c, 0) for c in STORAGE_CLASSES}) for k in keys]

    async def ref_counts(self, keys: Sequence[ChunkKey]) -> list[RefCounts]:
        if not keys:
            return []
        return await self._call(lambda db: self._counts(db, list(keys)))

    async def tombstoned(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        now = time.time()
        stoned = await self._call(lambda db: self._tombstoned_set(db, list(keys), now))
        return [k in stoned for k in keys]

    # -- garbage collection ------------------------------------------------------------------
    async def claim_garbage(
        self, *, grace_s: float, limit: int, lease_s: float, token: str | None = None
    ) -> GarbageClaim:
        """Claim the oldest candidates first (first unreferenced, first collected: no tenant
        waits behind a later one). Candidates stay recorded until :meth:`finish_claim`;
        candidates tombstoned by another live claim are skipped, those of ``token`` answered
        again (idempotent)."""
        token = token or new_claim_token()
        started = time.monotonic()
        now = time.time()

        def tx(db: sqlite3.Connection) -> list[ChunkKey]:
            db.execute("DELETE FROM tombstones WHERE expires <= ?", (now,))
            rows = db.execute(
                "SELECT g.key FROM garbage g LEFT JOIN tombstones t ON t.key = g.key "
                "WHERE g.since <= ? AND (t.key IS NULL OR t.token = ?) ORDER BY g.since LIMIT ?",
                (now - grace_s, token, limit),
            ).fetchall()
            candidates = [ChunkKey(bytes(r[0])) for r in rows]
            if not candidates:
                return []
            referenced = {
                bytes(r[0])
                for r in self._in(db, "SELECT key FROM refs WHERE key IN ({marks})", candidates)
            }
            db.executemany("DELETE FROM garbage WHERE key=?", [(k,) for k in referenced])
            claimed = [k for k in candidates if k not in referenced]
            db.executemany(
                "INSERT INTO tombstones (key, token, expires) VALUES (?,?,?) "
                "ON CONFLICT (key) DO NOTHING",
                [(k, token, now + lease_s) for k in claimed],
            )
            return claimed

        keys = await self._write(tx, release=True)
        return GarbageClaim(
            token=token, keys=tuple(keys), deadline=started + lease_s, claimed_at=now
        )

    async def finish_claim(self, claim: GarbageClaim) -> None:
        if not claim.keys:
            return

        def tx(db: sqlite3.Connection) -> None:
            for k in claim.keys:
                cur = db.execute("DELETE FROM tombstones WHERE key=? AND token=?", (k, claim.token))
                if cur.rowcount:  # still ours: the candidate goes unless released again
                    db.execute(
                        "DELETE FROM garbage WHERE key=? AND since <= ? "
                        "AND NOT EXISTS (SELECT 1 FROM refs WHERE refs.key = garbage.key)",
                        (k, claim.claimed_at),
                    )

        await self._write(tx, release=True)

    async def abandon_claim(self, claim: GarbageClaim) -> None:
        if claim.keys:
            await self._requeue(list(claim.keys), claim.token)

    async def requeue_unreferenced(self, keys: Sequence[ChunkKey]) -> int:
        if not keys:
            return 0
        return await self._requeue(list(dict.fromkeys(keys)), None)

    async def _requeue(self, keys: list[ChunkKey], token: str | None) -> int:
        def tx(db: sqlite3.Connection) -> int:
            if token is not None:
                db.executemany(
                    "DELETE FROM tombstones WHERE key=? AND token=?", [(k, token) for k in keys]
                )
            referenced = {
                bytes(r[0])
                for r in self._in(db, "SELECT key FROM refs WHERE key IN ({marks})", keys)
            }
            now = time.time()
            before = db.total_changes
            db.executemany(
                "INSERT INTO garbage (key, since) VALUES (?,?) ON CONFLICT (key) DO NOTHING",
                [(k, now) for k in keys if k not in referenced],
            )
            return db.total_changes - before

        return await self._write(tx, release=True)

    async def health(self) -> TierHealth:
        try:
            await self._call(lambda db: db.execute("SELECT 1").fetchone())
        except StoreError as e:
            return TierHealth("down", e.message)
        return TierHealth("ok", f"SQLite index at {self.path}")

    async def close(self) -> None:
        with self._lock:
            self._db.close()
