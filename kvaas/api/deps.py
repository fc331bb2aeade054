"""FastAPI dependencies: what routers take from the application (settings, database sessions,
services, the price book), API-key auth and admin auth.

Routers never read ``request.app.state`` themselves: the application's lifespan puts its
resources there (see :mod:`kvaas.app`) and the typed dependencies below hand them out.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.auth.resolver import INVALID_KEY_MESSAGE, AuthContext, resolve, stashed
from kvaas.auth.tenancy import Actor
from kvaas.billing.pricebook import PriceBook
from kvaas.config import Settings
from kvaas.db.repositories import ApiKeyRepository
from kvaas.db.session import Database
from kvaas.errors import AuthenticationError, PermissionDenied
from kvaas.metrics import AUTH_FAILURES
from kvaas.services.caches import CacheService

__all__ = [
    "INVALID_KEY_MESSAGE",
    "AdminActor",
    "Auth",
    "AuthContext",
    "CacheServiceDep",
    "HealthChecksDep",
    "PriceBookDep",
    "SessionDep",
    "SettingsDep",
    "authenticate",
    "require_admin",
]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_admin_bearer = HTTPBearer(
    auto_error=False, scheme_name="AdminToken", description="`Authorization: Bearer <admin token>`"
)

#: A readiness probe: returns a detail string, raises when its component is down.
HealthCheck = Callable[[], Awaitable[str | None]]


# --- application resources ----------------------------------------------------------------------
def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_cache_service(request: Request) -> CacheService:
    return request.app.state.cache_service


def get_pricebook(request: Request) -> PriceBook:
    return request.app.state.pricebook


def get_health_checks(request: Request) -> dict[str, HealthCheck]:
    return request.app.state.health_checks


async def get_session(db: Annotated[Database, Depends(get_db)]) -> AsyncIterator[AsyncSession]:
    async with db.session() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
CacheServiceDep = Annotated[CacheService, Depends(get_cache_service)]
PriceBookDep = Annotated[PriceBook, Depends(get_pricebook)]
HealthChecksDep = Annotated[dict[str, HealthCheck], Depends(get_health_checks)]


# --- callers ------------------------------------------------------------------------------------
async def authenticate(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AuthContext:
    """The caller of a tenant API request: 401 for any bad key, 403 for a disabled tenant.

    Reuses the resolution a middleware stashed for this request (one key lookup per request)
    and resolves the bearer credential itself otherwise. Counts each failure once in
    ``kvaas_auth_failures_total`` and records the key's use (``last_used_at``).
    """
    resolution = stashed(request.scope)
    if resolution is None:
        resolution = await resolve(session, credentials.credentials if credentials else None)
    if not isinstance(resolution, AuthContext):
        AUTH_FAILURES.labels(resolution.reason).inc()
        raise resolution.error()
    if await ApiKeyRepository(session).touch(resolution.key):
        await session.commit()
    return resolution


Auth = Annotated[AuthContext, Depends(authenticate)]


async def require_admin(
    request: Request,
    settings: SettingsDep,
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
