"""``/v1/me``: who the API key belongs to."""

from __future__ import annotations

from fastapi import APIRouter

from kvaas.api.deps import Auth, require_scope
from kvaas.api.errors import error_responses
from kvaas.api.schemas.account import Me
from kvaas.auth.keys import display_prefix
from kvaas.errors import AuthenticationError, PermissionDenied

router = APIRouter(prefix="/v1", tags=["account"])


@router.get(
    "/me",
    dependencies=[require_scope(None)],
    summary="Describe the calling tenant and API key",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def get_me(auth: Auth) -> Me:
    t, k = auth.tenant, auth.key
    return Me(
        tenant_id=t.id,
        tenant_name=t.name,
        status=t.status,
        storage_quota_tokens=t.storage_quota_tokens,
        storage_quota_bytes=t.storage_quota_bytes,
        key_id=k.id,
        key_display=display_prefix(k.prefix),
        scopes=list(k.scopes),
    )
