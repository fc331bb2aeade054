"""Caches.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "caches",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("model_fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("prefix_sha256", sa.String(64), nullable=False),
        sa.Column("chunk_tokens", sa.Integer(), nullable=False),
        sa.Column("stored_chunks", sa.Integer(), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("compression", sa.String(16), nullable=False),
        sa.Column("storage_class", sa.String(16), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("hit_count", sa.BigInteger(), nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("deleted_at", TS, nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'ready', 'expired', 'deleted', 'failed')",
            name=op.f("ck_caches_status"),
        ),
        sa.CheckConstraint(
            "storage_class IN ('hot', 'standard', 'cold')", name=op.f("ck_caches_storage_class")
        ),
        sa.CheckConstraint("tokens >= 0", name=op.f("ck_caches_tokens")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_caches_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_caches")),
    )
    op.create_index("ix_caches_tenant_created", "caches", ["tenant_id", "created_at"])
    op.create_index("ix_caches_expires", "caches", ["status", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_caches_expires", table_name="caches")
    op.drop_index("ix_caches_tenant_created", table_name="caches")
    op.drop_table("caches")
