"""``/v1/me``: who the API key belongs to."""

from __future__ import annotations

from fastapi import APIRouter

from kvaas.api.deps import Auth, SettingsDep, require_scope
from kvaas.api.errors import error_responses
from kvaas.api.schemas.account import Me
from kvaas.auth.keys import display_prefix
from kvaas.errors import AuthenticationError, PermissionDenied
from kvaas.services.quotas import Limits, limits_of

router = APIRouter(prefix="/v1", tags=["account"])


@router.get(
    "/me",
    dependencies=[require_scope(None)],
    summary="Describe the calling tenant and API key",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def get_me(auth: Auth, settings: SettingsDep) -> Me:
    """The tenant, the limits in force for it, and the calling key."""
    t, k = auth.tenant, auth.key
    limits = limits_of(t, Limits.from_settings(settings))
    return Me(
        tenant_id=t.id,
        tenant_name=t.name,
        status=t.status,
        storage_quota_tokens=limits.storage_tokens,
        storage_quota_bytes=limits.storage_bytes,
        max_caches=limits.max_caches,
        key_id=k.id,
        key_display=display_prefix(k.prefix),
        scopes=list(k.scopes),
    )
