"""Database engine and sessions (SQLAlchemy 2, asyncio).

One :class:`Database` per process. SQLite (embedded default, via aiosqlite) and PostgreSQL
(via psycopg 3) run the same code. Connection failures surface as
:class:`DatabaseUnavailable`, which the API turns into a 503; the pool pre-pings connections so
the service recovers on its own when the database comes back. Each such failure is also told
to the listeners registered with :meth:`Database.on_outage` (the gateway's key cache forgets
every key then, so no request is answered from memory while the database is down).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, exc, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


class DatabaseUnavailable(Exception):
    """The metadata database cannot be reached (or timed out)."""


#: Driver-level failures that mean "the database is not there", as opposed to a bad query.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.TimeoutError,
    ConnectionError,
    TimeoutError,
)


#: SQLite's answers when the database's lock was not had within the busy timeout.
_SQLITE_BUSY = ("database is locked", "database table is locked", "database is busy")


def is_connection_error(error: BaseException) -> bool:
    """True when ``error`` means the database is unreachable rather than a query problem."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, exc.OperationalError):
        # SQLite raises OperationalError for real query problems too ("no such table"); a
        # write lock not had within the busy timeout is the database being unavailable.
        if error.orig is None or "sqlite" not in type(error.orig).__module__:
            return True
        return any(m in str(error.orig) for m in _SQLITE_BUSY)
    return isinstance(error, CONNECTION_ERRORS)


def sync_url(url: str) -> str:
    """The synchronous-driver twin of an async URL (used by Alembic)."""
    u = make_url(url)
    if u.drivername == "sqlite+aiosqlite":
        u = u.set(drivername="sqlite")
    return u.render_as_string(hide_password=False)


class Database:
    """Owns the async engine and hands out sessions."""

    def __init__(self, url: str, *, pool_size: int = 10, timeout: float = 5.0) -> None:
        self.url = url
        u = make_url(url)
        self.dialect = u.get_backend_name()
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.dialect == "sqlite":
            if u.database and u.database != ":memory:":
                Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": timeout}
        elif self.dialect == "postgresql":
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_timeout=timeout)
            # Keep libpq options given in the URL (e.g. a search_path) and add a timeout.
            url_options = u.query.get("options", "")
            if isinstance(url_options, tuple):
                url_options = " ".join(url_options)
            kwargs["connect_args"] = {
                "connect_timeout": max(1, int(timeout)),
                "options": f"{url_options} -c statement_timeout={int(timeout * 1000)}".strip(),
            }
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.dialect == "sqlite":
            busy_ms = int(timeout * 1000)
            event.listen(
                self.engine.sync_engine,
                "connect",
                lambda conn, record: _sqlite_pragmas(conn, record, busy_ms),
            )
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self._outage_listeners: list[Callable[[], None]] = []

    def on_outage(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (synchronously, before the error is raised) each time a session or
        :meth:`ping` finds the database unreachable."""
        self._outage_listeners.append(listener)

    def outage(self, error: BaseException) -> DatabaseUnavailable:
        """Tell the listeners the database is unreachable and return the error to raise."""
        for listener in self._outage_listeners:
            listener()
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return DatabaseUnavailable(first_line)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session; commit is the caller's job, rollback happens on error."""
        try:
            async with self.sessionmaker() as s:
                yield s
        except BaseException as e:
            if isinstance(e, Exception) and is_connection_error(e):
                raise self.outage(e) from e
            raise

    async def ping(self) -> None:
        """Raise :class:`DatabaseUnavailable` unless ``SELECT 1`` succeeds."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as e:  # any failure here means "not ready"
            raise self.outage(e) from e

    async def dispose(self) -> None:
        await self.engine.dispose()


async def lock_for_write(session: AsyncSession, entity: type[Any], column: Any, key: Any) -> None:
    """Hold ``entity``'s row ``column == key`` (``column``: a mapped attribute) for writing
    until ``session``'s transaction ends, so a read-then-write that follows is atomic against
    every other process: PostgreSQL's row lock (``SELECT ... FOR UPDATE``); on SQLite, which
    has no row locks and whose transactions take the write lock only at their first write, a
    write that changes nothing takes the database's write lock now (what ``BEGIN IMMEDIATE``
    gives: later reads in the transaction see every commit, and no other writer commits
    before this one)."""
    bind = session.get_bind()
    if bind.dialect.name == "sqlite":
        table, name = entity.__table__.name, column.key  # our own models' names, not input
        await session.execute(
            text(f"UPDATE {table} SET {name} = {name} WHERE {name} = :key"), {"key": key}
        )
    else:
        await session.execute(select(column).where(column == key).with_for_update())


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, busy_ms: int = 5000) -> None:
    """Foreign keys on, WAL, and a writer waits ``busy_ms`` for the write lock (the
    database's timeout) before it fails."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    cur.close()
