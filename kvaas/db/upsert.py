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


def _dialect(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind is not None else "sqlite"


def _insert(session: AsyncSession, target: Table | type[DeclarativeBase]) -> Any:
    return (postgresql.insert if _dialect(session) == "postgresql" else sqlite.insert)(target)


def _table(target: Table | type[DeclarativeBase]) -> Table:
    return target if isinstance(target, Table) else target.__table__  # type: ignore[return-value]


#: ``INSERT … ON CONFLICT DO NOTHING [RETURNING]`` statements, built once per dialect, table,
#: conflict columns and returned column (building one costs more than running it on SQLite).
_IGNORING: dict[tuple[str, str, tuple[str, ...], str | None], Any] = {}


def _ignoring(
    session: AsyncSession,
    target: Table | type[DeclarativeBase],
    conflict: Sequence[str],
    returning: Any,
) -> Any:
    table = _table(target)
    column = None if returning is None else str(returning.key)
    name = (_dialect(session), table.name, tuple(conflict), column)
    stmt = _IGNORING.get(name)
    if stmt is None:
        stmt = _insert(session, table).on_conflict_do_nothing(index_elements=list(conflict))
        if column is not None:
            stmt = stmt.returning(table.c[column])
        _IGNORING[name] = stmt
    return stmt


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
    stmt = _ignoring(session, target, conflict, returning)
    result = await session.execute(stmt, dict(values))
    if returning is not None:
        return result.first() is not None
    return bool(getattr(result, "rowcount", 0))


async def insert_ignore_many(
    session: AsyncSession,
    target: Table | type[DeclarativeBase],
    rows: Sequence[Mapping[str, Any]],
    conflict: Sequence[str],
    *,
    returning: Any,
) -> int:
    """Insert every row of ``rows`` whose ``conflict`` columns are not taken yet (not
    committed; one statement for one row, one batch for several); the number inserted,
    counted through ``returning`` (a column). Column defaults computed in Python are applied to
    each row."""
    if not rows:
        return 0
    if len(rows) == 1:
        return int(await insert_ignore(session, target, rows[0], conflict, returning=returning))
    stmt = _ignoring(session, target, conflict, returning)
    result = await session.execute(stmt, [dict(r) for r in rows])
    return len(result.all())


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
