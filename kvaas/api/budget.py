"""``/v1/budget``: the calling tenant's monthly budget and spend so far this month."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvaas.api.deps import Auth, SessionDep
from kvaas.api.errors import error_responses
from kvaas.billing.budget import BudgetStatus, evaluate_budget
from kvaas.billing.pricebook import PriceBook, from_minor
from kvaas.db.base import utcnow
from kvaas.db.models import Budget
from kvaas.errors import AuthenticationError, BadRequest, PermissionDenied

router = APIRouter(prefix="/v1", tags=["billing"])


class BudgetIn(BaseModel):
    """Exactly one of ``amount_minor`` (integer minor units) or ``amount`` (decimal string)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"amount": "250.00", "currency": "USD"}]}
    )
    amount_minor: int | None = Field(None, ge=0, description="Budget in minor units (cents).")
    amount: str | None = Field(None, max_length=32, description="Budget as a decimal string.")
    currency: str = Field(description="Must be the price book's currency.")

    @model_validator(mode="after")
    def _one(self) -> BudgetIn:
        if (self.amount_minor is None) == (self.amount is None):
            raise ValueError("give exactly one of `amount_minor` or `amount`")
        return self


class Threshold(BaseModel):
    threshold_pct: int
    at: datetime
    spend_minor: int


class BudgetOut(BaseModel):
    object: Literal["budget"] = "budget"
    month: str
    currency: str
    amount_minor: int | None = Field(description="The budget; null when none is set.")
    amount: str | None
    spend_minor: int = Field(description="Spend this month so far, priced like an invoice.")
    spend: str
    percent_used: str | None
    thresholds_crossed: list[Threshold]
    hard_limit: bool = Field(description="Whether new caches are refused at 100 %.")


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
        amount=None if status.budget_minor is None else str(from_minor(status.budget_minor, mu)),
        spend_minor=status.spend_minor,
        spend=str(from_minor(status.spend_minor, mu)),
        percent_used=pct,
        thresholds_crossed=[
            Threshold(threshold_pct=a.threshold_pct, at=a.at, spend_minor=a.spend_minor)
            for a in status.crossed
        ],
        hard_limit=hard_limit,
    )


@router.get(
    "/budget",
    summary="The monthly budget, spend so far this month and thresholds crossed",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def get_budget(auth: Auth, session: SessionDep, request: Request) -> BudgetOut:
    pricebook: PriceBook = request.app.state.pricebook
    status = await evaluate_budget(session, auth.tenant.id, pricebook)
    return _out(status, pricebook, request.app.state.settings.budget_hard_limit)


@router.put(
    "/budget",
    summary="Set the monthly budget",
    responses=error_responses(AuthenticationError, PermissionDenied, BadRequest),
)
async def put_budget(
    body: BudgetIn, auth: Auth, session: SessionDep, request: Request
) -> BudgetOut:
    pricebook: PriceBook = request.app.state.pricebook
    if body.currency.upper() != pricebook.currency:
        raise BadRequest(
            f"budgets are in {pricebook.currency}, the price book's currency", param="currency"
        )
    if body.amount is not None:
        try:
            amount = Decimal(body.amount)
        except InvalidOperation as e:
            raise BadRequest(f"not a decimal amount: {body.amount!r}", param="amount") from e
        minor = amount.scaleb(pricebook.minor_units)
        if not amount.is_finite() or amount < 0 or minor != minor.to_integral_value():
            raise BadRequest(
                f"amount must be >= 0 with at most {pricebook.minor_units} decimals",
                param="amount",
            )
        amount_minor = int(minor)
    else:
        assert body.amount_minor is not None
        amount_minor = body.amount_minor
    budget = await session.get(Budget, auth.tenant.id)
    if budget is None:
        session.add(
            Budget(
                tenant_id=auth.tenant.id,
                amount_minor=amount_minor,
                currency=pricebook.currency,
                updated_at=utcnow(),
            )
        )
    else:
        budget.amount_minor = amount_minor
        budget.currency = pricebook.currency
    await session.commit()
    status = await evaluate_budget(session, auth.tenant.id, pricebook)
    return _out(status, pricebook, request.app.state.settings.budget_hard_limit)
