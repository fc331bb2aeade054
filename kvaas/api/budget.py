"""``/v1/budget``: the calling tenant's monthly budget and spend so far this month."""

from __future__ import annotations

from decimal import Decimal

from fastapi import APIRouter

from kvaas.api.deps import Auth, PriceBookDep, SessionDep, SettingsDep, require_scope
from kvaas.api.errors import error_responses
from kvaas.api.schemas.budget import BudgetIn, BudgetOut, Threshold
from kvaas.billing.budget import BudgetStatus, evaluate_budget, set_budget
from kvaas.billing.money import format_minor, parse_minor
from kvaas.billing.pricebook import PriceBook
from kvaas.errors import AuthenticationError, BadRequest, PermissionDenied

router = APIRouter(prefix="/v1", tags=["billing"])


def _out(status: BudgetStatus, pricebook: PriceBook, hard_limit: bool) -> BudgetOut:
    mu = pricebook.minor_units
    pct = None
    if status.budget_minor:
        pct = str(
            (Decimal(status.spend_minor) * 100 / Decimal(status.budget_minor)).quantize(
                Decimal("0.1")
            )
        )
    return BudgetOut(
        month=status.month,
        currency=status.currency,
        amount_minor=status.budget_minor,
        amount=None if status.budget_minor is None else format_minor(status.budget_minor, mu),
        spend_minor=status.spend_minor,
        spend=format_minor(status.spend_minor, mu),
        percent_used=pct,
        thresholds_crossed=[
            Threshold(threshold_pct=a.threshold_pct, at=a.at, spend_minor=a.spend_minor)
            for a in status.crossed
        ],
        hard_limit=hard_limit,
    )


@router.get(
    "/budget",
    dependencies=[require_scope("invoices:read")],
    summary="The monthly budget, spend so far this month and thresholds crossed",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def get_budget(
    auth: Auth, session: SessionDep, settings: SettingsDep, pricebook: PriceBookDep
) -> BudgetOut:
    status = await evaluate_budget(session, auth.tenant.id, pricebook)
    return _out(status, pricebook, settings.budget_hard_limit)


@router.put(
    "/budget",
    dependencies=[require_scope("budget:write")],
    summary="Set the monthly budget",
    responses=error_responses(AuthenticationError, PermissionDenied, BadRequest),
)
async def put_budget(
    body: BudgetIn,
    auth: Auth,
    session: SessionDep,
    settings: SettingsDep,
    pricebook: PriceBookDep,
) -> BudgetOut:
    if body.currency.upper() != pricebook.currency:
        raise BadRequest(
            f"budgets are in {pricebook.currency}, the price book's currency", param="currency"
        )
    if body.amount is not None:
        amount_minor = parse_minor(body.amount, pricebook.minor_units, param="amount")
    else:
        assert body.amount_minor is not None
        amount_minor = body.amount_minor
    await set_budget(session, auth.tenant.id, amount_minor, pricebook.currency)
    status = await evaluate_budget(session, auth.tenant.id, pricebook)
    return _out(status, pricebook, settings.budget_hard_limit)
