"""``INSERT … ON CONFLICT``, written once for both databases.

SQLAlchemy spells the conflict clause per dialect (``postgresql.insert`` and ``sqlite.insert``
have the same methods but are different constructs); these helpers pick the dialect of the
session's connection and build the statement, so callers never switch on the dialect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase


def _insert(session: AsyncSession, target: Table | type[DeclarativeBase]) -> Any:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(target)


async def insert_ignore(
    session: AsyncSession,
    target: Table | type[DeclarativeBase],
    values: Mapping[str, Any],
    conflict: Sequence[str],
    *,
    returning: Any = None,
) -> bool:
    """Insert ``values`` unless a row with the same ``conflict`` columns exists (not
    committed). True if a row was inserted; with ``returning`` (a column), the inserted row is
    detected through it, otherwise through the row count."""
    stmt = _insert(session, target).values(**values).on_conflict_do_nothing(index_elements=conflict)
    if returning is not None:
        return (await session.execute(stmt.returning(returning))).first() is not None
    result = await session.execute(stmt)
    return bool(getattr(result, "rowcount", 0))


async def upsert(
    session: AsyncSession,
    target: Table | type[DeclarativeBase],
    values: Mapping[str, Any],
    conflict: Sequence[str],
    update: Mapping[str, Any],
) -> None:
    """Insert ``values``, or set ``update`` on the row with the same ``conflict`` columns, in one
    atomic statement (not committed)."""
    stmt = _insert(session, target).values(**values)
    await session.execute(stmt.on_conflict_do_update(index_elements=conflict, set_=dict(update)))
