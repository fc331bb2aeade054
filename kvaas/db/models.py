"""ORM models of the metadata database.

Identifiers are short prefixed random strings (``ten_…``, ``key_…``): unguessable, stable in
URLs and logs, and portable across SQLite and PostgreSQL.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from kvaas.db.base import Base, PortableJSON, UTCDateTime, utcnow

TENANT_STATUSES = ("active", "disabled")


def new_id(prefix: str) -> str:
    """A new random identifier like ``ten_3f9a…`` (96 bits of randomness)."""
    return f"{prefix}_{secrets.token_hex(12)}"


class Tenant(Base):
    """A customer account. Every cache, key and usage record belongs to one tenant."""

    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'disabled')", name="status"),
        CheckConstraint(
            "storage_quota_tokens IS NULL OR storage_quota_tokens >= 0", name="quota_tokens"
        ),
        CheckConstraint(
            "storage_quota_bytes IS NULL OR storage_quota_bytes >= 0", name="quota_bytes"
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    storage_quota_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    storage_quota_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: Most live (pending or ready) caches at once; ``None``: the ``default_max_caches`` setting.
    max_caches: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: Secret salt of the tenant's chunk-key namespace; never leaves the server. Stored wrapped
    #: under the master key (``w1:…``, :func:`kvaas.store.crypto.wrap_secret`) when the tenant
    #: is created by the API or the CLI; plain hex (64 digits) is read as it is.
    namespace_secret: Mapped[str] = mapped_column(
        String(160), default=lambda: secrets.token_hex(32)
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", lazy="raise")


class ApiKey(Base):
    """An API key. Only ``prefix`` (shown to users) and a hash of the secret are stored."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64), default="default")
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(PortableJSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys", lazy="raise")

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class AuditLog(Base):
    """Append-only record of administrative actions (who did what to which object)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant_at", "tenant_id", "at"),)

    id: Mapped[int] = mapped_column(
        # SQLite only auto-increments an INTEGER PRIMARY KEY.
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(PortableJSON, default=dict)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)


CACHE_STATUSES = ("pending", "ready", "expired", "deleted", "failed")
#: Statuses a tenant still sees (listing, quotas); the partial indexes below cover exactly these.
LISTED_STATUSES = ("pending", "ready", "failed")
_LISTED = text("status IN ('pending', 'ready', 'failed')")


class Cache(Base):
    """A stored prompt prefix: its tokens, where its KV lives and its lifecycle.

    The KV itself is in the tiered store under one manifest per version (rows of
    :class:`CacheVersion`); this row is the authority for ownership, status and expiry.
    ``version``, ``tokens``, ``token_ids`` (little-endian int32), ``prefix_sha256`` and
    ``stored_chunks`` describe the latest ready version; ``stored_bytes`` counts the chunks of
    all live versions once each. ``reserved_tokens``/``reserved_bytes`` hold what a prefill in
    progress (a pending create or extend) will add, so quotas count it before it lands.
    """

    __tablename__ = "caches"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'ready', 'expired', 'deleted', 'failed')", name="status"
        ),
        CheckConstraint("storage_class IN ('hot', 'standard', 'cold')", name="storage_class"),
        CheckConstraint("tokens >= 0", name="tokens"),
        # keyset pagination of a tenant's listed caches, newest or oldest first
        Index(
            "ix_caches_tenant_listed",
            "tenant_id",
            "created_at",
            "id",
            postgresql_where=_LISTED,
            sqlite_where=_LISTED,
        ),
        Index(
            "ix_caches_tenant_name",
            "tenant_id",
            "name",
            "created_at",
            "id",
            postgresql_where=_LISTED,
            sqlite_where=_LISTED,
        ),
        Index("ix_caches_expires", "status", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cache"))
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model: Mapped[str] = mapped_column(String(128))
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    tokens: Mapped[int] = mapped_column(Integer)
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)
    prefix_sha256: Mapped[str] = mapped_column(String(64))
    chunk_tokens: Mapped[int] = mapped_column(Integer)
    stored_chunks: Mapped[int] = mapped_column(Integer, default=0)
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reserved_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # the codec scheme; the column keeps the API's name for it
    scheme: Mapped[str] = mapped_column("compression", String(16))
    storage_class: Mapped[str] = mapped_column(String(16))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", PortableJSON, default=dict)
    hit_count: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Lifetime granted by the last TTL change; ``refresh_on_hit`` re-grants it on each attach.
    ttl_seconds: Mapped[int] = mapped_column(Integer, server_default="3600")
    refresh_on_hit: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


VERSION_STATUSES = ("pending", "ready", "failed", "deleted")


class CacheVersion(Base):
    """One version of a cache. Version ``n + 1`` holds version ``n``'s tokens followed by the
    extension's, so its first chunks are version ``n``'s (the same keys) and only the new ones
    are stored. The store keeps one manifest per live version."""

    __tablename__ = "cache_versions"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'ready', 'failed', 'deleted')", name="status"),
        CheckConstraint("version >= 1", name="version"),
    )

    cache_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("caches.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    tokens: Mapped[int] = mapped_column(Integer)
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)
    prefix_sha256: Mapped[str] = mapped_column(String(64))
    #: Full chunks of this version (its manifest's keys).
    chunks: Mapped[int] = mapped_column(Integer)
    #: Bytes of this version's chunks (shared ones included).
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    #: While ``pending``: until when the gateway process running its prefill vouches for it
    #: (renewed by that process's maintenance loop). A pending version past its lease has lost
    #: its gateway and the sweep fails it. ``None``: no lease (rows written before leases).
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class CacheTag(Base):
    """A tenant's named pointer to one of its caches (unique per tenant, re-pointable)."""

    __tablename__ = "cache_tags"
    __table_args__ = (Index("ix_cache_tags_cache", "cache_id"),)

    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    cache_id: Mapped[str] = mapped_column(String(40), ForeignKey("caches.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# --- limits: idempotency keys -----------------------------------------------------------------

IDEMPOTENCY_STATES = ("in_flight", "completed")


class IdempotencyRecord(Base):
    """One ``Idempotency-Key`` of one tenant: the request's hash and, once it finished, the
    response to replay. ``in_flight`` rows are a lock held by the request still running."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        CheckConstraint("state IN ('in_flight', 'completed')", name="state"),
        Index("ix_idempotency_keys_expires", "expires_at"),
    )

    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(1024), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="in_flight")
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_headers: Mapped[list[Any] | None] = mapped_column(PortableJSON, nullable=True)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    #: Size of the whole response body; above the stored limit the body is not kept
    #: (``response_body`` stays ``None``) and a replay says so instead of running again.
    response_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: The object the request created (a cache id), recorded in the create's own transaction:
    #: a retry after the gateway died before the response was stored answers with it.
    resource_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


# --- store releases (outbox) ------------------------------------------------------------------


class StoreRelease(Base):
    """A manifest release the store still owes: written in the transaction that retires a
    cache or version (delete, expiry, version delete, failed prefill), removed once the store
    confirmed the release. ``version`` ``None`` releases every stored version of the cache;
    ``chunk_keys`` (hex) are chunks a prefill may have written after a concurrent release,
    queued for collection too. Releasing is idempotent, so a row drained twice is harmless."""

    __tablename__ = "store_releases"
    __table_args__ = (Index("ix_store_releases_due", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    slot: Mapped[str] = mapped_column(String(16))
    cache_id: Mapped[str] = mapped_column(String(40))
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    chunk_keys: Mapped[list[str]] = mapped_column(PortableJSON, default=list)
    reason: Mapped[str] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# --- metering and billing -------------------------------------------------------------------

LIFECYCLE_KINDS = ("started", "resized", "class_changed", "tiers_changed", "ended")


class IdempotentRow:
    """Columns of every append-only table written idempotently: a row id, the unique
    ``idempotency_key`` (the same fact recorded twice keeps one row) and the tenant."""

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="CASCADE"))


class UsageEvent(IdempotentRow, Base):
    """Append-only usage ledger: one row per metered quantity (tokens, cache creations).

    ``idempotency_key`` is unique: recording the same event twice keeps one row. Tenants see
    an event as its random ``public_id`` (``ue_…``), never the row id: row ids count every
    tenant's events.
    """

    __tablename__ = "usage_events"
    __table_args__ = (
        CheckConstraint("quantity >= 0", name="quantity"),
        Index("ix_usage_events_tenant_at", "tenant_id", "occurred_at"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=lambda: new_id("ue"))
    meter: Mapped[str] = mapped_column(String(32))
    quantity: Mapped[int] = mapped_column(BigInteger)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    cache_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(PortableJSON, default=dict)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CacheLifecycleEvent(IdempotentRow, Base):
    """Append-only lifecycle of a cache's storage: started, resized, class or tiers changed,
    ended. Storage meters integrate the state these events describe over time."""

    __tablename__ = "cache_lifecycle_events"
    __table_args__ = (
        CheckConstraint(
            "kind IN ('started', 'resized', 'class_changed', 'tiers_changed', 'ended')",
            name="kind",
        ),
        Index("ix_cache_lifecycle_events_tenant_at", "tenant_id", "at"),
        Index("ix_cache_lifecycle_events_cache", "cache_id", "at"),
    )

    cache_id: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    storage_class: Mapped[str | None] = mapped_column(String(16), nullable=True)
    bytes_by_tier: Mapped[dict[str, int]] = mapped_column(PortableJSON, default=dict)
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Invoice(Base):
    """A tenant's invoice for one calendar month; lines in :class:`InvoiceLine`."""

    __tablename__ = "invoices"
    __table_args__ = (
        Index("uq_invoices_tenant_period", "tenant_id", "period", unique=True),
        CheckConstraint("total_minor >= 0", name="total"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("inv"))
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="CASCADE"))
    period: Mapped[str] = mapped_column(String(7))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime)
    currency: Mapped[str] = mapped_column(String(3))
    pricebook_version: Mapped[str] = mapped_column(String(32))
    subtotal_minor: Mapped[int] = mapped_column(BigInteger)
    total_minor: Mapped[int] = mapped_column(BigInteger)
    content_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="issued")
    payment_status: Mapped[str] = mapped_column(String(16), default="unpaid")
    payment_event_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    html_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    pdf_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class InvoiceLine(Base):
    """One priced meter on an invoice; ``usage_ref`` leads back to the usage behind it."""

    __tablename__ = "invoice_lines"
    __table_args__ = (
        Index("uq_invoice_lines_invoice_position", "invoice_id", "position", unique=True),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    invoice_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("invoices.id", ondelete="CASCADE")
    )
    position: Mapped[int] = mapped_column(Integer)
    meter: Mapped[str] = mapped_column(String(32))
    storage_class: Mapped[str | None] = mapped_column(String(16), nullable=True)
    description: Mapped[str] = mapped_column(Text)
    usage_quantity: Mapped[int] = mapped_column(BigInteger)
    free_quantity: Mapped[int] = mapped_column(BigInteger)
    quantity: Mapped[int] = mapped_column(BigInteger)
    unit: Mapped[str] = mapped_column(String(32))
    unit_quantity: Mapped[str] = mapped_column(String(40))
    unit_price: Mapped[str] = mapped_column(String(40))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    usage_ref: Mapped[dict[str, Any]] = mapped_column(PortableJSON, default=dict)


class StripeSync(IdempotentRow, Base):
    """What was sent to Stripe: one row per object created there, keyed idempotently."""

    __tablename__ = "stripe_sync"
    __table_args__ = (Index("ix_stripe_sync_local", "kind", "local_ref"),)

    kind: Mapped[str] = mapped_column(String(32))
    local_ref: Mapped[str] = mapped_column(String(64))
    stripe_id: Mapped[str] = mapped_column(String(64))
    request: Mapped[dict[str, Any]] = mapped_column(PortableJSON, default=dict)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class StripeEvent(Base):
    """A processed Stripe webhook event (its id is unique: redelivery is a no-op)."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    invoice_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Budget(Base):
    """A tenant's monthly spending budget in the price book's currency (minor units)."""

    __tablename__ = "budgets"
    __table_args__ = (CheckConstraint("amount_minor >= 0", name="amount"),)

    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class BudgetAlert(Base):
    """A budget threshold (80 or 100 percent) crossed in a month; recorded once."""

    __tablename__ = "budget_alerts"
    __table_args__ = (
        Index("uq_budget_alerts_once", "tenant_id", "month", "threshold_pct", unique=True),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="CASCADE"))
    month: Mapped[str] = mapped_column(String(7))
    threshold_pct: Mapped[int] = mapped_column(Integer)
    spend_minor: Mapped[int] = mapped_column(BigInteger)
    budget_minor: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
