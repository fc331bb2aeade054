"""What dashboard routes take from the request: the operator's session, the audit actor, the
application's resources (which a separate admin listener may lack), and form helpers."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.auth.tenancy import Actor
from kvaas.billing.pricebook import PriceBook, pricebook_for
from kvaas.config import Settings
from kvaas.dashboard.auth import DashboardSession, require_session
from kvaas.dashboard.render import page
from kvaas.errors import APIError, ValidationFailed
from kvaas.services.caches import CacheService

Operator = Annotated[DashboardSession, Depends(require_session)]

#: Who the audit log names for actions taken in the dashboard.
ACTOR = "admin-dashboard"

#: Messages a redirect after an action may show (by code: a link cannot inject text).
NOTICES = {
    "key-revoked": "The API key is revoked.",
    "limits-saved": "The tenant's limits are saved.",
    "budget-saved": "The tenant's budget is saved.",
    "tenant-disabled": "The tenant is disabled: its keys get 403 until it is enabled again.",
    "tenant-enabled": "The tenant is enabled.",
    "ttl-changed": "The cache's lifetime is changed.",
    "class-changed": "The cache's storage class is changed.",
    "cache-deleted": "The cache is deleted.",
    "invoices-run": "Invoicing ran; see the audit entry below for what it issued.",
    "invoices-synced": "The period's invoices are sent to Stripe.",
}


def actor(request: Request) -> Actor:
    return Actor(ACTOR, getattr(request.state, "request_id", None))


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def pricebook_of(request: Request) -> PriceBook:
    book: PriceBook | None = getattr(request.app.state, "pricebook", None)
    return book if book is not None else pricebook_for(settings_of(request).pricebook_path)


def service_of(request: Request) -> CacheService | None:
    """The cache service, or ``None`` on a listener without the engine and the store."""
    return getattr(request.app.state, "cache_service", None)


def redirect(path: str, **query: Any) -> RedirectResponse:
    q = {k: v for k, v in query.items() if v not in (None, "")}
    return RedirectResponse(path + ("?" + urlencode(q) if q else ""), status_code=303)


def notice_of(request: Request) -> str | None:
    return NOTICES.get(request.query_params.get("done", ""))


async def failed(
    request: Request,
    session: AsyncSession,
    operator: DashboardSession,
    what: str,
    error: APIError,
    back: str,
) -> Any:
    """The page for an action the service refused: what failed, why, and a way back. The
    session is rolled back (an audit entry added for the action goes with it)."""
    await session.rollback()
    return page(
        request,
        "error.html",
        operator,
        status_code=error.status_code,
        title=what,
        message=error.public_message,
        back=back,
    )


def optional_int(form: dict[str, str], name: str) -> int | None:
    """A form's integer field; blank is ``None``; 422 for anything else."""
    raw = form.get(name, "").strip().replace(",", "").replace("_", "")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValidationFailed(
            f"{name} must be a whole number, got {raw[:40]!r}", param=name
        ) from None
