"""A migrated database (SQLite and PostgreSQL) and helpers to make tenants and caches."""

from kvtest.ledger_db import cache_obj, db, make_tenant

__all__ = ["cache_obj", "db", "make_tenant"]
