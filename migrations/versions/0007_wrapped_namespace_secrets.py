"""Tenants: namespace secrets stored wrapped under the master key.

The column widens to hold ``w1:<key id>:<base64>``; values written before stay readable as
plain hex and are wrapped the next time their row is written.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.alter_column(
            "namespace_secret",
            existing_type=sa.String(length=64),
            type_=sa.String(length=160),
            existing_nullable=False,
        )


def downgrade() -> None:
    # wrapped values do not fit 64 characters: a downgrade needs them unwrapped first
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.alter_column(
            "namespace_secret",
            existing_type=sa.String(length=160),
            type_=sa.String(length=64),
            existing_nullable=False,
        )
