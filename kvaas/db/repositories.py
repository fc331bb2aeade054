"""Repositories: the only place SQL about tenants, keys and the audit log is written.

Each repository wraps an :class:`~sqlalchemy.ext.asyncio.AsyncSession`; callers own the
transaction (``await session.commit()``), so several repository calls can form one unit.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.auth.keys import NewKey, generate_key
from kvaas.db.base import utcnow
from kvaas.db.models import ApiKey, AuditLog, Tenant, new_id

#: ``last_used_at`` is written at most this often per key, to keep auth read-only on hot paths.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class TenantRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    async def create(
        self,
        name: str,
        *,
        storage_quota_tokens: int | None = None,
        storage_quota_bytes: int | None = None,
        max_caches: int | None = None,
        wrap_secret: Callable[[str, bytes], str] | None = None,
    ) -> Tenant:
        """A new tenant with a random namespace secret, stored as ``wrap_secret(tenant id,
        secret)`` when given (the master key's wrapping), else as hex."""
        tenant = Tenant(
            id=new_id("ten"),
            name=name,
            storage_quota_tokens=storage_quota_tokens,
            storage_quota_bytes=storage_quota_bytes,
            max_caches=max_caches,
        )
        secret = secrets.token_bytes(32)
        tenant.namespace_secret = wrap_secret(tenant.id, secret) if wrap_secret else secret.hex()
        self.s.add(tenant)
        await self.s.flush()
        return tenant

    async def get(self, tenant_id: str) -> Tenant | None:
        return await self.s.get(Tenant, tenant_id)

    async def get_by_name(self, name: str) -> Tenant | None:
        return (
            await self.s.execute(select(Tenant).where(Tenant.name == name))
        ).scalar_one_or_none()

    async def list(self, *, status: str | None = None) -> Sequence[Tenant]:
        q = select(Tenant).order_by(Tenant.created_at, Tenant.id)
        if status:
            q = q.where(Tenant.status == status)
        return (await self.s.execute(q)).scalars().all()

    async def set_status(self, tenant: Tenant, status: str) -> Tenant:
        tenant.status = status
        tenant.updated_at = utcnow()
        await self.s.flush()
        return tenant


class ApiKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    async def create(
        self, tenant_id: str, *, name: str = "default", scopes: list[str] | None = None
    ) -> tuple[ApiKey, NewKey]:
        """A new key row and its one-time plaintext."""
        new = generate_key()
        key = ApiKey(
            tenant_id=tenant_id,
            name=name,
            prefix=new.prefix,
            secret_hash=new.secret_hash,
            scopes=scopes or ["*"],
        )
        self.s.add(key)
        await self.s.flush()
        return key, new

    async def get(self, key_id: str) -> ApiKey | None:
        return await self.s.get(ApiKey, key_id)

    async def get_by_prefix(self, prefix: str) -> ApiKey | None:
        return (
            await self.s.execute(select(ApiKey).where(ApiKey.prefix == prefix))
        ).scalar_one_or_none()

    async def get_with_tenant(self, prefix: str) -> tuple[ApiKey, Tenant] | None:
        """The key with this prefix and its tenant, in one query."""
        row = (
            await self.s.execute(
                select(ApiKey, Tenant)
                .join(Tenant, Tenant.id == ApiKey.tenant_id)
                .where(ApiKey.prefix == prefix)
            )
        ).first()
        return (row[0], row[1]) if row else None

    async def list(self, tenant_id: str, *, include_revoked: bool = True) -> Sequence[ApiKey]:
        q = select(ApiKey).where(ApiKey.tenant_id == tenant_id)
        if not include_revoked:
            q = q.where(ApiKey.revoked_at.is_(None))
        return (await self.s.execute(q.order_by(ApiKey.created_at, ApiKey.id))).scalars().all()

    async def revoke(self, key: ApiKey) -> ApiKey:
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            await self.s.flush()
        return key

    async def touch(self, key: ApiKey, now: datetime | None = None) -> bool:
        """Record use of ``key``; writes only when the stored time is stale. True if written."""
        now = now or utcnow()
        if key.last_used_at is not None and now - key.last_used_at < LAST_USED_RESOLUTION:
            return False
        await self.s.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
        key.last_used_at = now
        return True


class AuditRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    async def record(
        self,
        *,
        actor: str,
        action: str,
        target_type: str,
        target_id: str,
        tenant_id: str | None = None,
        request_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> AuditLog:
        entry = AuditLog(
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            tenant_id=tenant_id,
            request_id=request_id,
            details=details or {},
        )
        self.s.add(entry)
        await self.s.flush()
        return entry

    async def list(self, *, tenant_id: str | None = None, limit: int = 100) -> Sequence[AuditLog]:
        q = select(AuditLog).order_by(AuditLog.id.desc()).limit(limit)
        if tenant_id:
            q = q.where(AuditLog.tenant_id == tenant_id)
        return (await self.s.execute(q)).scalars().all()
