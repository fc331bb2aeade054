"""A SQLite database whose write lock is not had within the busy timeout is an unavailable
database (503 with ``Retry-After``), not a server error; a bad query stays a bad query."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import create_async_engine

from kvaas.db.session import is_connection_error


async def test_a_held_write_lock_past_the_busy_timeout_counts_as_unavailable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0.1})
    try:
        async with engine.connect() as conn:
            with pytest.raises(exc.OperationalError) as locked:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
            assert "locked" in str(locked.value)
            assert is_connection_error(locked.value)
            with pytest.raises(exc.OperationalError) as bad_query:
                await conn.execute(text("SELECT * FROM no_such_table"))
            assert not is_connection_error(bad_query.value)
    finally:
        await engine.dispose()
        holder.execute("ROLLBACK")
        holder.close()
