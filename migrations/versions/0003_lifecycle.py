"""Cache lifecycle: versions, tags, async create progress.

Adds ``cache_versions`` (one row per version; existing caches become version rows of their
current version), ``cache_tags``, the cache columns ``ttl_seconds``, ``refresh_on_hit``,
``reserved_tokens`` and ``reserved_bytes``, ``tenants.max_caches``, and replaces the plain
``(tenant_id, created_at)`` index by partial keyset indexes over the listed statuses.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
LISTED = "status IN ('pending', 'ready', 'failed')"


def _partial(name: str, columns: list[str]) -> None:
    op.create_index(
        name,
        "caches",
        columns,
        postgresql_where=sa.text(LISTED),
        sqlite_where=sa.text(LISTED),
    )


def upgrade() -> None:
    op.add_column("tenants", sa.Column("max_caches", sa.Integer(), nullable=True))

    op.add_column(
        "caches",
        sa.Column("reserved_tokens", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.add_column(
        "caches",
        sa.Column("reserved_bytes", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.add_column(
        "caches", sa.Column("ttl_seconds", sa.Integer(), server_default="3600", nullable=False)
    )
    op.add_column(
        "caches",
        sa.Column("refresh_on_hit", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    # existing caches: the lifetime they were created with
    if op.get_bind().dialect.name == "postgresql":
        seconds = "CAST(EXTRACT(EPOCH FROM (expires_at - created_at)) AS INTEGER)"
    else:
        seconds = "CAST(ROUND((julianday(expires_at) - julianday(created_at)) * 86400) AS INTEGER)"
    op.execute(f"UPDATE caches SET ttl_seconds = {seconds}")

    op.drop_index("ix_caches_tenant_created", table_name="caches")
    _partial("ix_caches_tenant_listed", ["tenant_id", "created_at", "id"])
    _partial("ix_caches_tenant_name", ["tenant_id", "name", "created_at", "id"])

    op.create_table(
        "cache_versions",
        sa.Column("cache_id", sa.String(40), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("prefix_sha256", sa.String(64), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("deleted_at", TS, nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'ready', 'failed', 'deleted')",
            name=op.f("ck_cache_versions_status"),
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_cache_versions_version")),
        sa.ForeignKeyConstraint(
            ["cache_id"],
            ["caches.id"],
            name=op.f("fk_cache_versions_cache_id_caches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("cache_id", "version", name=op.f("pk_cache_versions")),
    )
    # every existing cache is its current version
    op.execute(
        "INSERT INTO cache_versions (cache_id, version, status, failure_reason, tokens, "
        "token_ids, prefix_sha256, chunks, stored_bytes, created_at, deleted_at) "
        "SELECT id, version, "
        "CASE WHEN status IN ('expired', 'deleted') THEN 'deleted' ELSE status END, "
        "failure_reason, tokens, token_ids, prefix_sha256, stored_chunks, stored_bytes, "
        "created_at, deleted_at FROM caches"
    )

    op.create_table(
        "cache_tags",
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("cache_id", sa.String(40), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["cache_id"],
            ["caches.id"],
            name=op.f("fk_cache_tags_cache_id_caches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_cache_tags_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "name", name=op.f("pk_cache_tags")),
    )
    op.create_index("ix_cache_tags_cache", "cache_tags", ["cache_id"])


def downgrade() -> None:
    op.drop_index("ix_cache_tags_cache", table_name="cache_tags")
    op.drop_table("cache_tags")
    op.drop_table("cache_versions")
    op.drop_index("ix_caches_tenant_name", table_name="caches")
    op.drop_index("ix_caches_tenant_listed", table_name="caches")
    op.create_index("ix_caches_tenant_created", "caches", ["tenant_id", "created_at"])
    for column in ("refresh_on_hit", "ttl_seconds", "reserved_bytes", "reserved_tokens"):
        op.drop_column("caches", column)  # SQLite >= 3.35 drops columns in place
    op.drop_column("tenants", "max_caches")
