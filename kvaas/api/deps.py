"""FastAPI dependencies: what routers take from the application (settings, database sessions,
services, the price book), API-key auth with per-route scopes, and admin auth.

Routers never read ``request.app.state`` themselves: the application's lifespan puts its
resources there (see :mod:`kvaas.app`) and the typed dependencies below hand them out.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.auth.cache import resolve_cached
from kvaas.auth.resolver import INVALID_KEY_MESSAGE, AuthContext, stashed
from kvaas.auth.tenancy import KNOWN_SCOPES, Actor
from kvaas.billing.pricebook import PriceBook
from kvaas.config import Settings
from kvaas.db.repositories import ApiKeyRepository
from kvaas.db.session import Database
from kvaas.errors import AuthenticationError, PermissionDenied
from kvaas.metrics import AUTH_FAILURES
from kvaas.services.caches import CacheService
from kvaas.store.crypto import MasterKeys

__all__ = [
    "INVALID_KEY_MESSAGE",
    "AdminActor",
    "Auth",
    "AuthContext",
    "CacheServiceDep",
    "HealthChecksDep",
    "MasterKeysDep",
    "PriceBookDep",
    "ScopeRequirement",
    "SessionDep",
    "SettingsDep",
    "authenticate",
    "require_admin",
    "require_scope",
    "route_auth",
]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_admin_bearer = HTTPBearer(
    auto_error=False, scheme_name="AdminToken", description="`Authorization: Bearer <admin token>`"
)

#: A readiness probe: returns a detail string, raises when its component is down.
HealthCheck = Callable[[], Awaitable[str | None]]


# --- application resources ----------------------------------------------------------------------
# Every dependency is a coroutine function: FastAPI runs a plain ``def`` dependency in its
# thread pool, one thread hop per dependency per request (a wake-up a busy machine delays),
# for what is an attribute read (tests/api/test_dependencies.py holds every route to this).
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> Database:
    return request.app.state.db


async def get_cache_service(request: Request) -> CacheService:
    return request.app.state.cache_service


async def get_pricebook(request: Request) -> PriceBook:
    return request.app.state.pricebook


async def get_master_keys(request: Request) -> MasterKeys:
    """The app's master keys (from its settings; a generated key is created on first use, in
    a thread: it reads or writes the key file)."""
    keys: MasterKeys | None = getattr(request.app.state, "master_keys", None)
    if keys is None:
        keys = await asyncio.to_thread(MasterKeys.from_settings, request.app.state.settings)
        request.app.state.master_keys = keys
    return keys


async def get_health_checks(request: Request) -> dict[str, HealthCheck]:
    return request.app.state.health_checks


async def get_session(db: Annotated[Database, Depends(get_db)]) -> AsyncIterator[AsyncSession]:
    async with db.session() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
CacheServiceDep = Annotated[CacheService, Depends(get_cache_service)]
PriceBookDep = Annotated[PriceBook, Depends(get_pricebook)]
MasterKeysDep = Annotated[MasterKeys, Depends(get_master_keys)]
HealthChecksDep = Annotated[dict[str, HealthCheck], Depends(get_health_checks)]


# --- callers ------------------------------------------------------------------------------------
async def authenticate(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AuthContext:
    """The caller of a tenant API request: 401 for any bad key, 403 for a disabled tenant.

    Reuses the resolution a middleware stashed for this request (one key lookup per request)
    and resolves the bearer credential itself otherwise, through the process's
    :class:`~kvaas.auth.cache.AuthCache` (a key that authenticated within the last
    ``KVAAS_AUTH_CACHE_SECONDS`` is not looked up again). A route that declares no scope
    (:func:`require_scope`) is refused (403) even to a valid key. Counts each failure once in
    ``kvaas_auth_failures_total`` and records the key's use (``last_used_at``).
    """
    resolution = stashed(request.scope)
    if resolution is None:
        credential = credentials.credentials if credentials else None
        resolution = await resolve_cached(request.app.state, credential)
    if not isinstance(resolution, AuthContext):
        AUTH_FAILURES.labels(resolution.reason).inc()
        raise resolution.error()
    takes_key, requirements = route_auth(request.scope.get("route"))
    if takes_key and not requirements:  # deny by default: the route declares no scope
        raise PermissionDenied("this route declares no API-key scope; no key may call it")
    if await ApiKeyRepository(session).touch(resolution.key):
        await session.commit()
    return resolution


Auth = Annotated[AuthContext, Depends(authenticate)]


class ScopeRequirement:
    """The API-key scope a route needs, declared with :func:`require_scope`. As a dependency it
    authenticates the caller and refuses (403) a key without the scope, before the route does
    any work."""

    def __init__(self, scope: str | None) -> None:
        self.scope = scope

    async def __call__(self, auth: Auth) -> AuthContext:
        if self.scope is not None and not auth.has_scope(self.scope):
            held = ", ".join(sorted(auth.scopes)) or "none"
            raise PermissionDenied(
                f"this API key lacks the `{self.scope}` scope this route needs (its scopes: "
                f"{held}); use a key with `{self.scope}` or `*`",
                extra={"required_scope": self.scope},
            )
        return auth

    def __repr__(self) -> str:
        return f"require_scope({self.scope!r})"


def require_scope(scope: str | None) -> Any:
    """``dependencies=[require_scope("caches:write")]``: the route needs an API key with
    ``scope`` (or ``*``); ``None`` declares on purpose that any valid key will do. Every route
    that takes an API key declares one: an API-key route without it stops start-up
    (:func:`kvaas.api.scopes.check_scoped`) and is refused at request time (deny by default)."""
    if scope is not None and scope not in KNOWN_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; known scopes: {list(KNOWN_SCOPES)}")
    return Depends(ScopeRequirement(scope))


async def _admit_engine_work(auth: Auth, service: CacheServiceDep) -> AsyncIterator[None]:
    with service.gate.admit(auth.tenant.id):
        yield


def engine_work() -> Any:
    """``dependencies=[require_scope(...), engine_work()]``: the route runs the engine for the
    caller's tenant. The request is admitted by the engine's fair gate before the route does
    any work, and refused at once (``429 engine_busy``) when the tenant's slots and queue are
    all taken (:meth:`kvaas.services.fairness.FairGate.admit`)."""
    return Depends(_admit_engine_work)


def _calls(dependant: Dependant) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def route_auth(route: object) -> tuple[bool, list[ScopeRequirement]]:
    """Whether ``route`` takes an API key, and the scope requirements it declares (read from
    its dependency tree once, then kept on the route: every request asks)."""
    if not isinstance(route, APIRoute):
        return False, []
    kept: tuple[bool, list[ScopeRequirement]] | None = getattr(route, "_kvaas_auth", None)
    if kept is None:
        calls = list(_calls(route.dependant))
        kept = authenticate in calls, [c for c in calls if isinstance(c, ScopeRequirement)]
        setattr(route, "_kvaas_auth", kept)  # noqa: B010 (not an attribute of APIRoute's)
    return kept


def runs_engine(route: object) -> bool:
    """Whether ``route`` declares :func:`engine_work` (its requests are admitted by the fair
    gate)."""
    return isinstance(route, APIRoute) and _admit_engine_work in _calls(route.dependant)


async def require_admin(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
) -> Actor:
    """Admin-token check for ``/admin/api``: 403 when no admin token is configured (or it is
    blank), 401 unless the bearer credential equals it. An empty credential never matches."""
    expected = settings.admin_token.get_secret_value().encode() if settings.admin_token else b""
    if not expected.strip():
        raise PermissionDenied("the admin API is disabled: set KVAAS_ADMIN_TOKEN to enable it")
    given = credentials.credentials.encode() if credentials else b""
    if not given or not hmac.compare_digest(given, expected):
        AUTH_FAILURES.labels("admin").inc()
        raise AuthenticationError("invalid admin token; pass `Authorization: Bearer <admin token>`")
    return Actor("admin-api", getattr(request.state, "request_id", None))


AdminActor = Annotated[Actor, Depends(require_admin)]
