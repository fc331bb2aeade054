"""Crash consistency: the store-release outbox, prefill leases, idempotency resources.

Adds ``store_releases`` (manifest releases owed to the store, written in the transaction that
retires a cache or version and removed once the store confirmed them),
``cache_versions.lease_expires_at`` (until when the gateway running a pending prefill vouches
for it), and ``idempotency_keys.resource_id`` / ``response_size`` (the object a create made,
recorded in its own transaction, and the size of a response too large to keep).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "store_releases",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("slot", sa.String(16), nullable=False),
        sa.Column("cache_id", sa.String(40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("chunk_keys", JSON, nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_store_releases")),
    )
    op.create_index("ix_store_releases_due", "store_releases", ["next_attempt_at"])
    op.add_column("cache_versions", sa.Column("lease_expires_at", TS, nullable=True))
    op.add_column("idempotency_keys", sa.Column("response_size", sa.BigInteger(), nullable=True))
    op.add_column("idempotency_keys", sa.Column("resource_id", sa.String(40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_column("resource_id")
        batch_op.drop_column("response_size")
    with op.batch_alter_table("cache_versions", schema=None) as batch_op:
        batch_op.drop_column("lease_expires_at")
    op.drop_index("ix_store_releases_due", table_name="store_releases")
    op.drop_table("store_releases")
