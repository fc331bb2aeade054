"""FastAPI dependencies: database sessions, API-key auth, admin auth."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.auth.keys import parse_key, secret_matches
from kvaas.auth.tenancy import Actor
from kvaas.config import Settings
from kvaas.db.models import ApiKey, Tenant
from kvaas.db.repositories import ApiKeyRepository
from kvaas.db.session import Database
from kvaas.errors import AuthenticationError, PermissionDenied
from kvaas.metrics import AUTH_FAILURES

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_admin_bearer = HTTPBearer(
    auto_error=False, scheme_name="AdminToken", description="`Authorization: Bearer <admin token>`"
)

#: One message for unknown, revoked and malformed keys alike: no oracle.
INVALID_KEY_MESSAGE = "invalid API key; pass `Authorization: Bearer <API key>`"


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Database:
    return request.app.state.db


async def get_session(db: Annotated[Database, Depends(get_db)]) -> AsyncIterator[AsyncSession]:
    async with db.session() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


@dataclass(frozen=True)
class AuthContext:
    """The caller of a tenant API request."""

    tenant: Tenant
    key: ApiKey

    def has_scope(self, scope: str) -> bool:
        return "*" in self.key.scopes or scope in self.key.scopes


async def authenticate(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AuthContext:
    """Resolve the bearer API key to its tenant. 401 for any bad key, 403 for a disabled tenant."""
    if credentials is None:
        AUTH_FAILURES.labels("missing").inc()
        raise AuthenticationError(INVALID_KEY_MESSAGE)
    parsed = parse_key(credentials.credentials)
    if parsed is None:
        AUTH_FAILURES.labels("malformed").inc()
        raise AuthenticationError(INVALID_KEY_MESSAGE)
    prefix, secret = parsed
    repo = ApiKeyRepository(session)
    found = await repo.get_with_tenant(prefix)
    if found is None or not secret_matches(secret, found[0].secret_hash):
        AUTH_FAILURES.labels("unknown").inc()
        raise AuthenticationError(INVALID_KEY_MESSAGE)
    key, tenant = found
    if key.revoked_at is not None:
        AUTH_FAILURES.labels("revoked").inc()
        raise AuthenticationError(INVALID_KEY_MESSAGE)
    if tenant.status != "active":
        AUTH_FAILURES.labels("tenant_disabled").inc()
        raise PermissionDenied(f"tenant {tenant.name!r} is disabled; contact the operator")
    if await repo.touch(key):
        await session.commit()
    return AuthContext(tenant=tenant, key=key)


Auth = Annotated[AuthContext, Depends(authenticate)]


async def require_admin(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings_dep)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
) -> Actor:
    """Admin-token check for ``/admin/api``. 403 when no admin token is configured."""
    if settings.admin_token is None:
        raise PermissionDenied("the admin API is disabled: set KVAAS_ADMIN_TOKEN to enable it")
    expected = settings.admin_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials else b""
    if not hmac.compare_digest(given, expected):
        AUTH_FAILURES.labels("admin").inc()
        raise AuthenticationError("invalid admin token; pass `Authorization: Bearer <admin token>`")
    return Actor("admin-api", getattr(request.state, "request_id", None))


AdminActor = Annotated[Actor, Depends(require_admin)]
