"""Operator API under ``/admin/api``: tenants and API keys, behind the admin token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from kvaas.api.deps import AdminActor, MasterKeysDep, SessionDep
from kvaas.api.errors import error_responses
from kvaas.api.schemas.admin import (
    ApiKeyOut,
    AuditEntryOut,
    KeyCreate,
    ListOf,
    NewApiKeyOut,
    TenantCreate,
    TenantCreated,
    TenantOut,
)
from kvaas.auth import tenancy
from kvaas.db.models import AuditLog, Tenant
from kvaas.db.repositories import ApiKeyRepository, AuditRepository, TenantRepository
from kvaas.errors import AuthenticationError, Conflict, NotFound, PermissionDenied

router = APIRouter(prefix="/admin/api", tags=["admin"])
_AUTH_ERRORS = (AuthenticationError, PermissionDenied)


TenantRef = Annotated[str, Path(description="Tenant id (`ten_…`) or name.", max_length=64)]


def _tenant_out(t: Tenant) -> TenantOut:
    return TenantOut.model_validate(t)


async def _new_key_out(session: SessionDep, key_id: str, secret: str) -> NewApiKeyOut:
    key = await ApiKeyRepository(session).get(key_id)
    assert key is not None
    return NewApiKeyOut.model_validate({**ApiKeyOut.of(key).model_dump(), "secret": secret})


@router.post(
    "/tenants",
    status_code=status.HTTP_201_CREATED,
    summary="Create a tenant (and its first API key)",
    responses=error_responses(*_AUTH_ERRORS, Conflict),
)
async def admin_create_tenant(
    body: TenantCreate, session: SessionDep, actor: AdminActor, master_keys: MasterKeysDep
) -> TenantCreated:
    tenant, secret = await tenancy.create_tenant(
        session,
        actor,
        body.name,
        storage_quota_tokens=body.storage_quota_tokens,
        storage_quota_bytes=body.storage_quota_bytes,
        max_caches=body.max_caches,
        with_key=body.create_key,
        master_keys=master_keys,
    )
    key_out = None
    if secret is not None:
        keys = await ApiKeyRepository(session).list(tenant.id)
        key_out = await _new_key_out(session, keys[0].id, secret)
    return TenantCreated(tenant=_tenant_out(tenant), api_key=key_out)


@router.get(
    "/tenants",
    summary="List tenants",
    responses=error_responses(*_AUTH_ERRORS),
)
async def admin_list_tenants(
    session: SessionDep,
    actor: AdminActor,
    status_: Annotated[str | None, Query(alias="status", pattern="^(active|disabled)$")] = None,
) -> ListOf[TenantOut]:
    tenants = await TenantRepository(session).list(status=status_)
    return ListOf[TenantOut](data=[_tenant_out(t) for t in tenants])


@router.get(
    "/tenants/{tenant}",
    summary="Get a tenant",
    responses=error_responses(*_AUTH_ERRORS, NotFound),
)
async def admin_get_tenant(tenant: TenantRef, session: SessionDep, actor: AdminActor) -> TenantOut:
    return _tenant_out(await tenancy.find_tenant(session, tenant))


def _tenant_status_route(action: str, status_: str, summary: str) -> None:
    """``POST /tenants/{tenant}/<action>``: set the tenant's status to ``status_``."""

    async def set_tenant_status(
        tenant: TenantRef, session: SessionDep, actor: AdminActor
    ) -> TenantOut:
        return _tenant_out(await tenancy.set_tenant_status(session, actor, tenant, status_))

    router.post(
        f"/tenants/{{tenant}}/{action}",
        name=f"admin_{action}_tenant",
        summary=summary,
        responses=error_responses(*_AUTH_ERRORS, NotFound),
    )(set_tenant_status)


_tenant_status_route(
    "disable", "disabled", "Disable a tenant (its keys get 403 until enabled again)"
)
_tenant_status_route("enable", "active", "Enable a disabled tenant")


@router.post(
    "/tenants/{tenant}/keys",
    status_code=status.HTTP_201_CREATED,
    summary="Create an API key for a tenant (the secret is returned once)",
    responses=error_responses(*_AUTH_ERRORS, NotFound),
)
async def admin_create_key(
    tenant: TenantRef, body: KeyCreate, session: SessionDep, actor: AdminActor
) -> NewApiKeyOut:
    key, secret = await tenancy.create_key(
        session, actor, tenant, name=body.name, scopes=body.scopes
    )
    return await _new_key_out(session, key.id, secret)


@router.get(
    "/tenants/{tenant}/keys",
    summary="List a tenant's API keys (prefixes only)",
    responses=error_responses(*_AUTH_ERRORS, NotFound),
)
async def admin_list_keys(
    tenant: TenantRef, session: SessionDep, actor: AdminActor
) -> ListOf[ApiKeyOut]:
    t = await tenancy.find_tenant(session, tenant)
    return ListOf[ApiKeyOut](
        data=[ApiKeyOut.of(k) for k in await ApiKeyRepository(session).list(t.id)]
    )


@router.delete(
    "/keys/{key}",
    summary="Revoke an API key (by id or prefix); idempotent",
    responses=error_responses(*_AUTH_ERRORS, NotFound),
)
async def admin_revoke_key(
    key: Annotated[str, Path(description="Key id (`key_…`) or prefix.", max_length=64)],
    session: SessionDep,
    actor: AdminActor,
) -> ApiKeyOut:
    return ApiKeyOut.of(await tenancy.revoke_key(session, actor, key))


@router.get(
    "/audit",
    summary="Recent administrative actions, newest first",
    responses=error_responses(*_AUTH_ERRORS),
)
async def admin_list_audit(
    session: SessionDep,
    actor: AdminActor,
    tenant_id: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ListOf[AuditEntryOut]:
    entries: list[AuditLog] = list(
        await AuditRepository(session).list(tenant_id=tenant_id, limit=limit)
    )
    return ListOf[AuditEntryOut](data=[AuditEntryOut.model_validate(e) for e in entries])
