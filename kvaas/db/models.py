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
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
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
    #: Secret salt of the tenant's chunk-key namespace; never leaves the server.
    namespace_secret: Mapped[str] = mapped_column(String(64), default=lambda: secrets.token_hex(32))
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


class Cache(Base):
    """A stored prompt prefix: its tokens, where its KV lives and its lifecycle.

    The KV itself is in the tiered store under the version's manifest; this row is the
    authority for ownership, status and expiry. ``token_ids`` holds the prefix's token ids
    (little-endian int32) so attach can prepend them to a request.
    """

    __tablename__ = "caches"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'ready', 'expired', 'deleted', 'failed')", name="status"
        ),
        CheckConstraint("storage_class IN ('hot', 'standard', 'cold')", name="storage_class"),
        CheckConstraint("tokens >= 0", name="tokens"),
        Index("ix_caches_tenant_created", "tenant_id", "created_at"),
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
    compression: Mapped[str] = mapped_column(String(16))
    storage_class: Mapped[str] = mapped_column(String(16))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", PortableJSON, default=dict)
    hit_count: Mapped[int] = mapped_column(BigInteger, default=0)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
