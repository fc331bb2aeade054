"""Monthly budgets: spend so far this month against a tenant's budget.

Crossing 80 % and 100 % of the budget is recorded once per month each (``budget_alerts``,
unique per tenant, month and threshold). :func:`check_create_allowed` is what the cache service
calls before a create: with ``KVAAS_BUDGET_HARD_LIMIT`` on, a tenant at or above 100 % gets
``402 budget_exceeded``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.billing.invoices import draft_invoice, period_of
from kvaas.billing.pricebook import PriceBook, pricebook_for
from kvaas.config import Settings
from kvaas.db.base import utcnow
from kvaas.db.models import Budget, BudgetAlert, Tenant
from kvaas.db.upsert import insert_ignore
from kvaas.errors import APIError

THRESHOLDS = (80, 100)


class BudgetExceeded(APIError):
    status_code = 402
    type = "budget_exceeded"
    description = "The tenant's monthly budget is spent; new caches are refused."


def month_start(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


@dataclass
class BudgetStatus:
    month: str
    currency: str
    spend_minor: int
    budget_minor: int | None
    crossed: list[BudgetAlert] = field(default_factory=list)

    @property
    def exhausted(self) -> bool:
        return self.budget_minor is not None and self.spend_minor >= self.budget_minor


def crossed_thresholds(spend_minor: int, budget_minor: int) -> list[int]:
    """Thresholds (percent) that ``spend_minor`` has reached: spend * 100 >= pct * budget."""
    return [t for t in THRESHOLDS if spend_minor * 100 >= t * budget_minor]


async def month_spend(
    session: AsyncSession, tenant_id: str, pricebook: PriceBook, now: datetime
) -> int:
    """What the tenant's usage from the start of ``now``'s month to ``now`` costs (minor
    units), priced exactly like an invoice."""
    draft, _ = await draft_invoice(
        session, tenant_id, month_start(now), now, pricebook, link_usage=False
    )
    return draft.total_minor


async def _record_alerts(
    session: AsyncSession, tenant_id: str, month: str, spend: int, budget: int, now: datetime
) -> None:
    """Insert crossed thresholds once, in a transaction of their own (an alert is a fact
    whatever happens to the caller's transaction)."""
    pcts = crossed_thresholds(spend, budget)
    if not pcts or session.bind is None:
        return
    async with AsyncSession(session.bind) as own:
        for pct in pcts:
            await insert_ignore(
                own,
                BudgetAlert,
                {
                    "tenant_id": tenant_id,
                    "month": month,
                    "threshold_pct": pct,
                    "spend_minor": spend,
                    "budget_minor": budget,
                    "at": now,
                },
                ["tenant_id", "month", "threshold_pct"],
            )
        await own.commit()


async def evaluate_budget(
    session: AsyncSession, tenant_id: str, pricebook: PriceBook, now: datetime | None = None
) -> BudgetStatus:
    """Spend this month, the budget, and the thresholds crossed (recording new crossings)."""
    now = now or utcnow()
    month = period_of(now)
    budget = await session.get(Budget, tenant_id)
    spend = await month_spend(session, tenant_id, pricebook, now)
    status = BudgetStatus(month, pricebook.currency, spend, budget.amount_minor if budget else None)
    if budget is not None:
        await _record_alerts(session, tenant_id, month, spend, budget.amount_minor, now)
        status.crossed = list(
            await session.scalars(
                select(BudgetAlert)
                .where(BudgetAlert.tenant_id == tenant_id, BudgetAlert.month == month)
                .order_by(BudgetAlert.threshold_pct)
            )
        )
    return status


async def check_create_allowed(
    session: AsyncSession,
    tenant: Tenant,
    settings: Settings,
    *,
    now: datetime | None = None,
) -> BudgetStatus | None:
    """Call before creating a cache. None when the tenant has no budget (nothing computed);
    otherwise the budget status, after recording any threshold crossed. Raises
    :class:`BudgetExceeded` (402) at or above 100 % when ``settings.budget_hard_limit``."""
    budget = await session.get(Budget, tenant.id)
    if budget is None:
        return None
    pricebook = pricebook_for(settings.pricebook_path)
    status = await evaluate_budget(session, tenant.id, pricebook, now)
    if settings.budget_hard_limit and status.exhausted:
        raise BudgetExceeded(
            f"the monthly budget of {pricebook.format(budget.amount_minor)} is spent "
            f"({pricebook.format(status.spend_minor)} so far in {status.month}); "
            "raise it with PUT /v1/budget",
            extra={"budget_minor": budget.amount_minor, "spend_minor": status.spend_minor},
        )
    return status
