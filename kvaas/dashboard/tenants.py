"""Tenants: search and page through them; a tenant's keys, limits, budget, caches, usage and
invoices; create tenants and keys (the secret shown once), revoke keys, disable and enable.

Every action goes through the same service as the admin API and the CLI
(:mod:`kvaas.auth.tenancy`), which writes the audit entry in the action's transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kvaas.api.deps import SessionDep, get_master_keys
from kvaas.auth import tenancy
from kvaas.billing.budget import set_budget
from kvaas.billing.invoices import tenant_invoices
from kvaas.dashboard.auth import form_of
from kvaas.dashboard.deps import (
    Operator,
    actor,
    failed,
    notice_of,
    optional_int,
    pricebook_of,
    redirect,
    settings_of,
)
from kvaas.dashboard.overview import MONEY_TTL, memo_of
from kvaas.dashboard.render import SECURITY_HEADERS, page
from kvaas.db.models import Budget
from kvaas.db.repositories import ApiKeyRepository
from kvaas.errors import APIError, ValidationFailed
from kvaas.services import admin_lists, admin_views, listing, quotas
from kvaas.services.usage_reports import usage_report
from kvaas.store.keys import derive_namespace, namespace_slot

router = APIRouter(prefix="/admin/tenants", include_in_schema=False)

STATUS_ACTIONS = {"disable": "disabled", "enable": "active"}


def tenant_path(ref: str) -> str:
    """The tenant's page (the reference quoted: it came from the request's path)."""
    return f"/admin/tenants/{quote(ref, safe='')}"


@router.get("")
async def dashboard_tenants(request: Request, session: SessionDep, operator: Operator) -> Response:
    q = request.query_params.get("q", "").strip()[:64]
    rows, cursor = await admin_lists.tenants_page(
        session, q=q, after=request.query_params.get("after") or None
    )
    return page(request, "tenants.html", operator, section="tenants", rows=rows, q=q, cursor=cursor)


@router.post("")
async def dashboard_create_tenant(
    request: Request, session: SessionDep, operator: Operator
) -> Response:
    form = await form_of(request)
    name = form.get("name", "").strip()
    try:
        tenant, secret = await tenancy.create_tenant(
            session, actor(request), name, with_key=True, master_keys=await get_master_keys(request)
        )
    except APIError as e:
        return await failed(request, session, operator, "Create tenant", e, "/admin/tenants")
    return await _tenant_page(request, session, operator, tenant.id, new_secret=secret)


async def _tenant_page(
    request: Request,
    session: SessionDep,
    operator: Operator,
    ref: str,
    *,
    new_secret: str | None = None,
    status_code: int = 200,
) -> Response:
    tenant = await tenancy.find_tenant(session, ref)
    settings = settings_of(request)
    book = pricebook_of(request)
    now = datetime.now(UTC)
    limits = quotas.limits_of(tenant, quotas.Limits.from_settings(settings))
    caches = await listing.list_caches(session, tenant.id, listing.CacheFilter(limit=10))
    audit, _ = await admin_lists.audit_page(session, tenant_id=tenant.id, limit=10)
    budget = await session.get(Budget, tenant.id)
    try:
        secret = tenancy.namespace_secret(tenant, await get_master_keys(request))
        scope: str | None = namespace_slot(derive_namespace(secret))
    except APIError:  # its keys are not configured on this gateway
        scope = None
    return page(
        request,
        "tenant.html",
        operator,
        status_code=status_code,
        section="tenants",
        tenant=tenant,
        keys=await ApiKeyRepository(session).list(tenant.id),
        new_secret=new_secret,
        limits=limits,
        used=await quotas.usage(session, tenant.id),
        budget=budget,
        budget_major=book.format(budget.amount_minor).split()[0] if budget else "",
        spend=book.format(await admin_views.tenant_spend(session, tenant.id, book, now)),
        caches=caches,
        invoices=list(await tenant_invoices(session, tenant.id))[:12],
        invoice_state=admin_lists.invoice_state,
        money=book.format,
        audit=audit,
        scopes=tenancy.KNOWN_SCOPES,
        cache_scope=scope,
        notice=notice_of(request),
    )


@router.get("/{ref}")
async def dashboard_tenant(
    ref: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    try:
        return await _tenant_page(request, session, operator, ref)
    except APIError as e:
        return await failed(request, session, operator, "Tenant", e, "/admin/tenants")


@router.get("/{ref}/usage.json")
async def dashboard_tenant_usage(
    ref: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    """The tenant's last 30 days per day, as ``/v1/usage`` reports them."""
    tenant = await tenancy.find_tenant(session, ref)
    now = datetime.now(UTC)
    start = (now - timedelta(days=29)).replace(hour=0, minute=0, second=0, microsecond=0)
    report = await usage_report(session, tenant.id, start, None, "day")
    data: dict[str, Any] = {
        "labels": [b.start.strftime("%m-%d") for b in report.buckets],
        "cached_tokens": [b.events.get("cached_tokens", 0) for b in report.buckets],
        "prefill_tokens": [b.events.get("prefill_tokens", 0) for b in report.buckets],
        "token_hours": [
            round(sum(b.storage_token_seconds.values()) / 3600) for b in report.buckets
        ],
    }
    return JSONResponse(data, headers=SECURITY_HEADERS)


@router.get("/{ref}/keys")
async def dashboard_keys_page(ref: str, operator: Operator) -> Response:
    """Where a key's creation left the browser: the tenant's page (the secret is not shown
    again)."""
    return redirect(tenant_path(ref))


@router.post("/{ref}/keys")
async def dashboard_create_key(
    ref: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    form = await form_of(request)
    scopes = [s for s in form.get("scopes", "*").replace(",", " ").split() if s] or ["*"]
    try:
        key, secret = await tenancy.create_key(
            session,
            actor(request),
            ref,
            name=form.get("name", "").strip() or "default",
            scopes=scopes,
        )
        return await _tenant_page(request, session, operator, key.tenant_id, new_secret=secret)
    except APIError as e:
        return await failed(request, session, operator, "Create key", e, tenant_path(ref))


@router.post("/{ref}/keys/{key}/revoke")
async def dashboard_revoke_key(
    ref: str, key: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    back = tenant_path(ref)
    try:
        tenant = await tenancy.find_tenant(session, ref)
        row = await ApiKeyRepository(session).get(key)
        if row is None or row.tenant_id != tenant.id:
            raise ValidationFailed(f"no API key {key!r} of this tenant", param="key")
        await tenancy.revoke_key(session, actor(request), key)
    except APIError as e:
        return await failed(request, session, operator, "Revoke key", e, back)
    return redirect(back, done="key-revoked")


@router.post("/{ref}/limits")
async def dashboard_set_limits(
    ref: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    form = await form_of(request)
    back = tenant_path(ref)
    try:
        await tenancy.set_tenant_limits(
            session,
            actor(request),
            ref,
            storage_quota_tokens=optional_int(form, "storage_quota_tokens"),
            storage_quota_bytes=optional_int(form, "storage_quota_bytes"),
            max_caches=optional_int(form, "max_caches"),
        )
    except APIError as e:
        return await failed(request, session, operator, "Save limits", e, back)
    return redirect(back, done="limits-saved")


@router.post("/{ref}/budget")
async def dashboard_set_budget(
    ref: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    """Set the tenant's monthly budget (in the price book's currency), audited in the same
    transaction as the change."""
    form = await form_of(request)
    back = tenant_path(ref)
    book = pricebook_of(request)
    try:
        tenant = await tenancy.find_tenant(session, ref)
        try:
            amount = Decimal(form.get("amount", "").strip())
        except InvalidOperation:
            raise ValidationFailed(
                "the budget must be an amount like 250.00", param="amount"
            ) from None
        minor = book.to_minor(amount) if amount.is_finite() else -1
        if not 0 <= minor < 2**63:
            raise ValidationFailed("the budget must be a non-negative amount", param="amount")
        old = await session.get(Budget, tenant.id)
        await actor(request).audit(
            session,
            "budget.set",
            tenant,
            {"before_minor": old.amount_minor if old else None, "after_minor": minor},
        )
        await set_budget(session, tenant.id, minor, book.currency)  # commits both
        memo_of(request, "money", MONEY_TTL).forget("all")  # spend against budgets changed
    except APIError as e:
        return await failed(request, session, operator, "Save budget", e, back)
    return redirect(back, done="budget-saved")


@router.get("/{ref}/confirm/{action}")
async def dashboard_confirm_status(
    ref: str, action: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    try:
        tenant = await tenancy.find_tenant(session, ref)
        if action not in STATUS_ACTIONS:
            raise ValidationFailed("the action is disable or enable", param="action")
    except APIError as e:
        return await failed(request, session, operator, "Tenant", e, "/admin/tenants")
    return page(
        request,
        "confirm.html",
        operator,
        section="tenants",
        title=f"{action.capitalize()} tenant {tenant.name}?",
        body=(
            "Its API keys will get 403 until it is enabled again; its caches stay stored."
            if action == "disable"
            else "Its API keys will work again."
        ),
        action=f"/admin/tenants/{tenant.id}/{action}",
        button=f"{action.capitalize()} {tenant.name}",
        back=f"/admin/tenants/{tenant.id}",
    )


@router.post("/{ref}/{action}")
async def dashboard_set_status(
    ref: str, action: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    back = tenant_path(ref)
    try:
        if action not in STATUS_ACTIONS:
            raise ValidationFailed("the action is disable or enable", param="action")
        await tenancy.set_tenant_status(session, actor(request), ref, STATUS_ACTIONS[action])
    except APIError as e:
        return await failed(request, session, operator, "Change tenant status", e, back)
    return redirect(back, done=f"tenant-{action}d")
