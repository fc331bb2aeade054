"""Connection settings of the real PostgreSQL and Redis servers the tests use."""

from __future__ import annotations

import os
import secrets
from urllib.parse import quote

import psycopg

POSTGRES_URL = os.environ.get(
    "KVAAS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("KVAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _libpq_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with_search_path(url: str, schema: str) -> str:
    """``url`` on ``schema``, its connections named after it (``application_name``), so the
    ones still open can be found in ``pg_stat_activity``."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}&application_name={schema}"


class PgSchema:
    """A throw-away PostgreSQL schema; ``url`` points SQLAlchemy at it."""

    def __init__(self) -> None:
        self.name = f"kvaas_t_{secrets.token_hex(6)}"
        with psycopg.connect(_libpq_url(POSTGRES_URL), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{self.name}"')
        self.url = _with_search_path(POSTGRES_URL, self.name)

    def open_connections(self) -> list[tuple[str, str]]:
        """``(state, last query)`` of every connection still open on this schema's URL."""
        with psycopg.connect(_libpq_url(POSTGRES_URL), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT coalesce(state, ''), coalesce(query, '') FROM pg_stat_activity"
                " WHERE application_name = %s AND pid <> pg_backend_pid()",
                (self.name,),
            ).fetchall()
        return [(str(state), str(query)) for state, query in rows]

    def drop(self) -> None:
        """Drop the schema. A connection of the test's still holding a lock on it (a
        transaction left open) fails the drop within 30 s, naming what that connection ran,
        rather than blocking it until the test's timeout."""
        with psycopg.connect(_libpq_url(POSTGRES_URL), autocommit=True) as conn:
            conn.execute("SET lock_timeout = '30s'")
            try:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
            except psycopg.errors.LockNotAvailable as e:
                raise AssertionError(
                    f"schema {self.name} is still locked by: {self.open_connections()}"
                ) from e
