"""Usage ledger, invoices, Stripe sync, budgets.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"],
        ["tenants.id"],
        name=op.f(f"fk_{table}_tenant_id_tenants"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "usage_events",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("meter", sa.String(32), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("cache_id", sa.String(40), nullable=True),
        sa.Column("details", JSON, nullable=False),
        sa.Column("recorded_at", TS, nullable=False),
        sa.CheckConstraint("quantity >= 0", name=op.f("ck_usage_events_quantity")),
        _tenant_fk("usage_events"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_events")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_usage_events_idempotency_key")),
    )
    op.create_index("ix_usage_events_tenant_at", "usage_events", ["tenant_id", "occurred_at"])

    op.create_table(
        "cache_lifecycle_events",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("cache_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("storage_class", sa.String(16), nullable=True),
        sa.Column("bytes_by_tier", JSON, nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("recorded_at", TS, nullable=False),
        sa.CheckConstraint(
            "kind IN ('started', 'resized', 'class_changed', 'tiers_changed', 'ended')",
            name=op.f("ck_cache_lifecycle_events_kind"),
        ),
        _tenant_fk("cache_lifecycle_events"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cache_lifecycle_events")),
        sa.UniqueConstraint(
            "idempotency_key", name=op.f("uq_cache_lifecycle_events_idempotency_key")
        ),
    )
    op.create_index(
        "ix_cache_lifecycle_events_tenant_at", "cache_lifecycle_events", ["tenant_id", "at"]
    )
    op.create_index("ix_cache_lifecycle_events_cache", "cache_lifecycle_events", ["cache_id", "at"])

    op.create_table(
        "invoices",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("period", sa.String(7), nullable=False),
        sa.Column("period_start", TS, nullable=False),
        sa.Column("period_end", TS, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("pricebook_version", sa.String(32), nullable=False),
        sa.Column("subtotal_minor", sa.BigInteger(), nullable=False),
        sa.Column("total_minor", sa.BigInteger(), nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("payment_status", sa.String(16), nullable=False),
        sa.Column("payment_event_at", TS, nullable=True),
        sa.Column("stripe_invoice_id", sa.String(64), nullable=True),
        sa.Column("html_path", sa.Text(), nullable=True),
        sa.Column("pdf_path", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("total_minor >= 0", name=op.f("ck_invoices_total")),
        _tenant_fk("invoices"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
    )
    op.create_index("uq_invoices_tenant_period", "invoices", ["tenant_id", "period"], unique=True)

    op.create_table(
        "invoice_lines",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("invoice_id", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("meter", sa.String(32), nullable=False),
        sa.Column("storage_class", sa.String(16), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("usage_quantity", sa.BigInteger(), nullable=False),
        sa.Column("free_quantity", sa.BigInteger(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("unit", sa.String(32), nullable=False),
        sa.Column("unit_quantity", sa.String(40), nullable=False),
        sa.Column("unit_price", sa.String(40), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("usage_ref", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_id"],
            ["invoices.id"],
            name=op.f("fk_invoice_lines_invoice_id_invoices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoice_lines")),
    )
    op.create_index(
        "uq_invoice_lines_invoice_position",
        "invoice_lines",
        ["invoice_id", "position"],
        unique=True,
    )

    op.create_table(
        "stripe_sync",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("local_ref", sa.String(64), nullable=False),
        sa.Column("stripe_id", sa.String(64), nullable=False),
        sa.Column("request", JSON, nullable=False),
        sa.Column("at", TS, nullable=False),
        _tenant_fk("stripe_sync"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_sync")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_stripe_sync_idempotency_key")),
    )
    op.create_index("ix_stripe_sync_local", "stripe_sync", ["kind", "local_ref"])

    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("invoice_id", sa.String(32), nullable=True),
        sa.Column("received_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_events")),
    )

    op.create_table(
        "budgets",
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint("amount_minor >= 0", name=op.f("ck_budgets_amount")),
        _tenant_fk("budgets"),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_budgets")),
    )

    op.create_table(
        "budget_alerts",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("threshold_pct", sa.Integer(), nullable=False),
        sa.Column("spend_minor", sa.BigInteger(), nullable=False),
        sa.Column("budget_minor", sa.BigInteger(), nullable=False),
        sa.Column("at", TS, nullable=False),
        _tenant_fk("budget_alerts"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_alerts")),
    )
    op.create_index(
        "uq_budget_alerts_once",
        "budget_alerts",
        ["tenant_id", "month", "threshold_pct"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index("uq_budget_alerts_once", table_name="budget_alerts")
    op.drop_table("budget_alerts")
    op.drop_table("budgets")
    op.drop_table("stripe_events")
    op.drop_index("ix_stripe_sync_local", table_name="stripe_sync")
    op.drop_table("stripe_sync")
    op.drop_index("uq_invoice_lines_invoice_position", table_name="invoice_lines")
    op.drop_table("invoice_lines")
    op.drop_index("uq_invoices_tenant_period", table_name="invoices")
    op.drop_table("invoices")
    op.drop_index("ix_cache_lifecycle_events_cache", table_name="cache_lifecycle_events")
    op.drop_index("ix_cache_lifecycle_events_tenant_at", table_name="cache_lifecycle_events")
    op.drop_table("cache_lifecycle_events")
    op.drop_index("ix_usage_events_tenant_at", table_name="usage_events")
    op.drop_table("usage_events")
