"""Administrative operations on tenants and API keys.

Shared by the admin API and the CLI. Each function runs inside the caller's session and
records an audit entry in the same transaction, then commits: an action is never without its
audit record, nor the other way round.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.auth.cache import invalidate as forget_callers
from kvaas.db.models import ApiKey, Tenant
from kvaas.db.repositories import ApiKeyRepository, AuditRepository, TenantRepository
from kvaas.errors import Conflict, NotFound, ServiceUnavailable, ValidationFailed
from kvaas.store.crypto import (
    MasterKeys,
    SealError,
    is_wrapped,
    namespace_secret_context,
    unwrap_secret,
    wrap_secret,
)

TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: Scopes an API key may hold (``*``: all). Each API route declares the one it needs
#: (``kvaas.api.deps.require_scope``); docs/api.md has the table.
KNOWN_SCOPES = ("*", "caches:read", "caches:write", "usage:read", "invoices:read", "budget:write")


@dataclass(frozen=True)
class Actor:
    """Who performs an action, for the audit log: ``admin-api`` or ``cli`` plus a request id."""

    name: str
    request_id: str | None = None

    async def audit(
        self,
        session: AsyncSession,
        action: str,
        target: Tenant | ApiKey,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Record ``action`` on ``target`` by this actor in the audit log, in the caller's
        transaction (the caller commits)."""
        if isinstance(target, Tenant):
            target_type, tenant_id = "tenant", target.id
        else:
            target_type, tenant_id = "api_key", target.tenant_id
        await AuditRepository(session).record(
            actor=self.name,
            action=action,
            target_type=target_type,
            target_id=target.id,
            tenant_id=tenant_id,
            request_id=self.request_id,
            details=details,
        )


def validate_tenant_name(name: str) -> str:
    if not TENANT_NAME_RE.match(name):
        raise ValidationFailed(
            "tenant name must be 1-63 characters of a-z, 0-9, '-' or '_', "
            "starting with a letter or digit",
            param="name",
        )
    return name


def validate_scopes(scopes: Sequence[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(KNOWN_SCOPES))
    if unknown:
        raise ValidationFailed(
            f"unknown scope(s) {unknown}; known scopes: {list(KNOWN_SCOPES)}", param="scopes"
        )
    return list(dict.fromkeys(scopes)) or ["*"]


def _wrap(keys: MasterKeys, tenant_id: str, secret: bytes) -> str:
    return wrap_secret(keys, secret, namespace_secret_context(tenant_id))


def namespace_secret(tenant: Tenant, master_keys: MasterKeys) -> bytes:
    """The tenant's namespace secret, unwrapped (a secret stored in clear is read as it is);
    ``503`` when this gateway's master keys cannot unwrap it (a key id not configured here)."""
    stored = tenant.namespace_secret
    if not is_wrapped(stored):
        return bytes.fromhex(stored)
    try:
        return unwrap_secret(master_keys, stored, namespace_secret_context(tenant.id))
    except SealError as e:
        raise ServiceUnavailable(
            "the tenant's keys are not available on this gateway; contact the operator",
            detail=f"namespace secret of {tenant.id}: {e}",
        ) from None


async def create_tenant(
    session: AsyncSession,
    actor: Actor,
    name: str,
    *,
    storage_quota_tokens: int | None = None,
    storage_quota_bytes: int | None = None,
    max_caches: int | None = None,
    with_key: bool = True,
    master_keys: MasterKeys | None = None,
) -> tuple[Tenant, str | None]:
    """Create a tenant (and, by default, its first API key). Returns the key's plaintext once.
    With ``master_keys`` (the API and the CLI always pass them) the tenant's namespace secret
    is stored wrapped under the current master key."""
    validate_tenant_name(name)
    tenants = TenantRepository(session)
    if await tenants.get_by_name(name) is not None:
        raise Conflict(f"a tenant named {name!r} already exists", param="name")
    try:
        tenant = await tenants.create(
            name,
            storage_quota_tokens=storage_quota_tokens,
            storage_quota_bytes=storage_quota_bytes,
            max_caches=max_caches,
            wrap_secret=None if master_keys is None else functools.partial(_wrap, master_keys),
        )
        plaintext = None
        details: dict[str, object] = {"name": name}
        if with_key:
            key, new = await ApiKeyRepository(session).create(tenant.id)
            plaintext = new.plaintext
            details["key_id"] = key.id
        await actor.audit(session, "tenant.create", tenant, details)
        await session.commit()
    except IntegrityError as e:  # a concurrent create with the same name won the race
        await session.rollback()
        raise Conflict(f"a tenant named {name!r} already exists", param="name") from e
    return tenant, plaintext


async def find_tenant(session: AsyncSession, ref: str) -> Tenant:
    """A tenant by id (``ten_…``) or by name; 404 otherwise."""
    repo = TenantRepository(session)
    tenant = await repo.get(ref) if ref.startswith("ten_") else await repo.get_by_name(ref)
    if tenant is None:
        raise NotFound(f"no tenant {ref!r}", param="tenant")
    return tenant


async def set_tenant_status(session: AsyncSession, actor: Actor, ref: str, status: str) -> Tenant:
    tenant = await find_tenant(session, ref)
    if tenant.status != status:
        await TenantRepository(session).set_status(tenant, status)
        action = "tenant.enable" if status == "active" else "tenant.disable"
        await actor.audit(session, action, tenant)
        await session.commit()
        forget_callers()
    return tenant


async def create_key(
    session: AsyncSession,
    actor: Actor,
    tenant_ref: str,
    *,
    name: str = "default",
    scopes: Sequence[str] = ("*",),
) -> tuple[ApiKey, str]:
    tenant = await find_tenant(session, tenant_ref)
    key, new = await ApiKeyRepository(session).create(
        tenant.id, name=name, scopes=validate_scopes(scopes)
    )
    details = {"prefix": key.prefix, "name": name, "scopes": key.scopes}
    await actor.audit(session, "key.create", key, details)
    await session.commit()
    return key, new.plaintext


async def revoke_key(session: AsyncSession, actor: Actor, ref: str) -> ApiKey:
    """Revoke a key by id (``key_…``) or prefix. Revoking twice is a no-op."""
    repo = ApiKeyRepository(session)
    key = await repo.get(ref) if ref.startswith("key_") else await repo.get_by_prefix(ref)
    if key is None:
        raise NotFound(f"no API key {ref!r}", param="key")
    if key.revoked_at is None:
        await repo.revoke(key)
        await actor.audit(session, "key.revoke", key, {"prefix": key.prefix})
        await session.commit()
        forget_callers()
    return key


async def set_tenant_limits(
    session: AsyncSession,
    actor: Actor,
    ref: str,
    *,
    storage_quota_tokens: int | None,
    storage_quota_bytes: int | None,
    max_caches: int | None,
) -> Tenant:
    """Set the tenant's own limits (``None``: the configured default applies) and record it
    in the audit log in the same transaction. 422 for a negative limit."""
    limits = {
        "storage_quota_tokens": storage_quota_tokens,
        "storage_quota_bytes": storage_quota_bytes,
        "max_caches": max_caches,
    }
    for field, value in limits.items():
        top = 2**31 if field == "max_caches" else 2**63  # the columns' integer widths
        if value is not None and not 0 <= value < top:
            raise ValidationFailed(f"{field} must be an integer in [0, {top})", param=field)
    tenant = await find_tenant(session, ref)
    before = {f: getattr(tenant, f) for f in limits}
    if before != limits:
        for f, v in limits.items():
            setattr(tenant, f, v)
        await actor.audit(session, "tenant.limits", tenant, {"before": before, "after": limits})
        await session.commit()
        forget_callers()
    return tenant
