"""Metadata database: models, sessions, repositories and migrations."""

from kvaas.db.session import Database, DatabaseUnavailable

__all__ = ["Database", "DatabaseUnavailable"]
