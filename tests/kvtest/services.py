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
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


class PgSchema:
    """A throw-away PostgreSQL schema; ``url`` points SQLAlchemy at it."""

    def __init__(self) -> None:
        self.name = f"kvaas_t_{secrets.token_hex(6)}"
        with psycopg.connect(_libpq_url(POSTGRES_URL), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{self.name}"')
        self.url = _with_search_path(POSTGRES_URL, self.name)

    def drop(self) -> None:
        with psycopg.connect(_libpq_url(POSTGRES_URL), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
