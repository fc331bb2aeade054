"""Usage events: opaque public ids.

Tenants see a usage event as a random ``ue_…`` id instead of the table's row id, which
counts every tenant's events. Existing events get one each.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("public_id", sa.String(length=32), nullable=True))
    events = sa.table("usage_events", sa.column("id", sa.BigInteger), sa.column("public_id"))
    conn = op.get_bind()
    while ids := conn.scalars(
        sa.select(events.c.id).where(events.c.public_id.is_(None)).limit(BATCH)
    ).all():
        conn.execute(
            events.update().where(events.c.id == sa.bindparam("row_id")),
            [{"row_id": i, "public_id": f"ue_{secrets.token_hex(12)}"} for i in ids],
        )
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.alter_column("public_id", existing_type=sa.String(length=32), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_usage_events_public_id"), ["public_id"])


def downgrade() -> None:
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_usage_events_public_id"), type_="unique")
        batch_op.drop_column("public_id")
