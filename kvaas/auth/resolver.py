"""One resolver from a request's ``Authorization`` header to its caller.

:func:`resolve` turns the header into an :class:`AuthContext` (the API key and its tenant) or an
:class:`AuthFailure` (why it does not authenticate). It counts nothing and raises nothing: the
API's ``authenticate`` dependency turns a failure into its error and its metric, so a request
resolved twice would still be counted once.

A request is resolved once: a middleware that needs the caller before the application
(idempotency) resolves it and :func:`stash`-es the result in the ASGI scope's ``state``;
``authenticate`` takes it from there (:func:`stashed`) and resolves only requests nobody
resolved before.

Checks, in order: a ``Bearer`` credential is present (``missing``), shaped like an API key
(``malformed``), names a stored key whose secret matches (``unknown``), not revoked
(``revoked``), of an active tenant (``tenant_disabled``, the only failure that names the tenant:
only a valid key's holder learns it). Scopes are carried here and enforced per route by the
scope each route declares (``kvaas.api.deps.require_scope``).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.auth.keys import parse_key, secret_matches
from kvaas.db.models import ApiKey, Tenant
from kvaas.db.repositories import ApiKeyRepository
from kvaas.errors import APIError, AuthenticationError, PermissionDenied

#: One message for unknown, revoked and malformed keys alike: no oracle.
INVALID_KEY_MESSAGE = "invalid API key; pass `Authorization: Bearer <API key>`"
#: Where :func:`stash` keeps a request's resolution inside ``scope["state"]``.
SCOPE_STATE_KEY = "auth"

FailureReason = Literal["missing", "malformed", "unknown", "revoked", "tenant_disabled"]


@dataclass(frozen=True)
class AuthContext:
    """The caller of a tenant API request: its API key and the key's tenant (both loaded, and
    usable after the session that loaded them is closed)."""

    tenant: Tenant
    key: ApiKey

    @property
    def scopes(self) -> frozenset[str]:
        """The key's scopes (``*``: all of them)."""
        return frozenset(self.key.scopes)

    def has_scope(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class AuthFailure:
    """Why a request does not authenticate. ``reason`` is the ``kvaas_auth_failures_total``
    label; ``tenant_name`` is set for ``tenant_disabled`` only."""

    reason: FailureReason
    tenant_name: str | None = None

    def error(self) -> APIError:
        """401 with :data:`INVALID_KEY_MESSAGE`, or 403 for a disabled tenant."""
        if self.reason == "tenant_disabled":
            return PermissionDenied(
                f"tenant {self.tenant_name!r} is disabled; contact the operator"
            )
        return AuthenticationError(INVALID_KEY_MESSAGE)


Resolution = AuthContext | AuthFailure


def bearer_credential(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <credential>`` header value, else ``None``
    (read exactly as FastAPI's ``HTTPBearer`` reads it: scheme case-insensitive, the credential
    stripped)."""
    if not authorization:
        return None
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if not scheme or not credential or scheme.lower() != "bearer":
        return None
    return credential


async def resolve(session: AsyncSession, credential: str | None) -> Resolution:
    """The caller presenting ``credential`` (the bearer credential, ``None`` when absent).
    Reads the key and its tenant in one query; writes nothing."""
    if credential is None:
        return AuthFailure("missing")
    parsed = parse_key(credential)
    if parsed is None:
        return AuthFailure("malformed")
    prefix, secret = parsed
    found = await ApiKeyRepository(session).get_with_tenant(prefix)
    if found is None or not secret_matches(secret, found[0].secret_hash):
        return AuthFailure("unknown")
    key, tenant = found
    if key.revoked_at is not None:
        return AuthFailure("revoked")
    if tenant.status != "active":
        return AuthFailure("tenant_disabled", tenant.name)
    return AuthContext(tenant=tenant, key=key)


def stash(scope: MutableMapping[str, Any], resolution: Resolution) -> None:
    """Keep ``resolution`` with the request (ASGI ``scope["state"]``) for :func:`stashed`."""
    scope.setdefault("state", {})[SCOPE_STATE_KEY] = resolution


def stashed(scope: MutableMapping[str, Any]) -> Resolution | None:
    """The resolution :func:`stash`-ed for this request, or ``None`` when none was."""
    value = scope.get("state", {}).get(SCOPE_STATE_KEY)
    return value if isinstance(value, AuthContext | AuthFailure) else None
