"""One runner at a time for the maintenance steps that several gateways must not run at once.

Several gateway processes (behind a load balancer, or ``kvaas serve --workers N``) share one
metadata database and one store. Each runs the maintenance loop of :mod:`kvaas.app`; the
steps that work on shared state (the cache sweep, the store-release outbox drain, the
reconciler, the ``Idempotency-Key`` sweep, garbage collection) are each taken by one process
per round. Every step is idempotent, so a second runner would not corrupt anything, but two
runners at once both take the same rows: each outbox row is released twice and counted twice,
each orphan found twice and queued twice, and the work is done twice.

Contract of :meth:`MaintenanceLocks.exclusive`:

- ``async with locks.exclusive(name) as mine``: ``mine`` is True in exactly one process at a
  time per ``name`` (among all processes on the same database schema); the others get False at once
  (they never wait) and skip the step this round. The lock is released when the block ends,
  and by the server if the process dies (it never outlives its holder: no lease to expire).
- PostgreSQL: a transaction-scoped advisory lock (``pg_try_advisory_xact_lock``) on a
  connection of its own, held for the block. Advisory locks are per database, so the key is
  derived from ``name`` and the connection's ``current_schema()``: deployments in separate
  schemas of one database never hold each other's locks. The transaction stays open (idle,
  without a snapshot) while the step runs: a server ``idle_in_transaction_session_timeout``
  shorter than a step ends it early and lets a second runner in (harmless, as above).
- SQLite: an exclusive ``flock`` on a file next to the database file, so several processes on
  one host (``--workers``) take turns too. A SQLite database shared by several hosts is not a
  supported deployment (one gateway host only: see docs/operations.md). An in-memory database
  is private to its process: always True.
- Steps that are per process by nature (renewing the leases of this process's own prefills,
  the per-tier billing journal of this process's store moves, housekeeping of its own
  connections) take no lock.

Start-up migrations take the same kind of lock, blocking (:func:`upgrade_exclusively`): gateways
started together migrate one after the other, and the later ones find the schema current.

``kvaas_maintenance_steps_total{step,result}`` counts each process's rounds: ``ran`` (this
process held the lock and the step finished), ``skipped`` (another process held it), ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from prometheus_client import Counter
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from kvaas.db import migrate
from kvaas.db.session import Database, sync_url

log = logging.getLogger("kvaas.maintenance")

STEPS = Counter(
    "kvaas_maintenance_steps_total",
    "Maintenance steps of this process: ran (it held the step's lock), skipped (another "
    "process held it), failed.",
    ["step", "result"],
)


#: The advisory lock key of a step (``:name``) in the connection's schema: a ``bigint``, the
#: same in every process and version.
_KEY = "hashtextextended('kvaas.maintenance:' || coalesce(current_schema(), '') || ':' || :name, 0)"


class MaintenanceLocks:
    """Per-step exclusion among the processes sharing ``db`` (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._dir: Path | None = None
        if db.dialect == "sqlite":
            database = make_url(db.url).database
            if database and database != ":memory:":
                self._dir = Path(database).parent
                self._stem = Path(database).name

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """True in one process at a time per ``name``; never waits for the holder."""
        if self.db.dialect == "postgresql":
            async with self.db.engine.connect() as conn:
                got = (
                    await conn.execute(
                        text(f"SELECT pg_try_advisory_xact_lock({_KEY})"), {"name": name}
                    )
                ).scalar()
                try:
                    yield bool(got)
                finally:  # ends the transaction, and with it the lock
                    await conn.rollback()
        elif self._dir is not None:
            path = self._dir / f"{self._stem}.maintenance-{name}.lock"
            fd = await asyncio.to_thread(os.open, path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
                yield True  # closing the descriptor releases the lock
            finally:
                os.close(fd)
        else:
            yield True

    async def run(self, name: str, step: Callable[[], Awaitable[object]]) -> bool:
        """Run ``step`` if this process takes ``name``'s lock; True if it ran. A step's
        exception propagates (counted ``failed``) after the lock is released."""
        async with self.exclusive(name) as mine:
            if not mine:
                STEPS.labels(name, "skipped").inc()
                return False
            try:
                await step()
            except Exception:
                STEPS.labels(name, "failed").inc()
                raise
        STEPS.labels(name, "ran").inc()
        return True


def upgrade_exclusively(url: str) -> None:
    """:func:`kvaas.db.migrate.upgrade` under a lock every process migrating the same database
    takes (blocking; PostgreSQL: a session advisory lock, released with its connection; SQLite:
    a ``flock`` next to the database file). Synchronous: run it in a thread."""
    u = make_url(url)
    if u.get_backend_name() == "postgresql":
        engine = create_engine(sync_url(url))
        try:
            with engine.connect() as conn:
                conn.execute(text(f"SELECT pg_advisory_lock({_KEY})"), {"name": "migrate"})
                conn.commit()
                try:
                    migrate.upgrade(url)
                finally:
                    conn.execute(text(f"SELECT pg_advisory_unlock({_KEY})"), {"name": "migrate"})
                    conn.commit()
        finally:
            engine.dispose()
    elif u.database and u.database != ":memory:":
        path = Path(u.database)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / f"{path.name}.migrate.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            migrate.upgrade(url)
        finally:
            os.close(fd)
    else:
        migrate.upgrade(url)
