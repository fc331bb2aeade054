"""Monthly budgets: spend so far this month against a tenant's budget.

Crossing 80 % and 100 % of the budget is recorded once per month each (``budget_alerts``,
unique per tenant, month and threshold). :func:`check_create_allowed` is what the cache service
calls before a create: with ``KVAAS_BUDGET_HARD_LIMIT`` on, a tenant at or above 100 % gets
``402 budget_exceeded``.

Spend is priced exactly like an invoice (:func:`kvaas.billing.pricing.price_usage` over the
month's meters). ``GET /v1/budget`` (:func:`evaluate_budget`) computes it exactly every time.
The create-time check reads a running month-to-date total instead (:class:`MonthToDate`): a
snapshot of the month's meters, computed in full at most every
:data:`SPEND_REFRESH_SECONDS` per tenant (and on the first check of a month), plus, at each
check, the usage events recorded since the snapshot (one indexed query over those few events).
Token meters are therefore current at every check; what the snapshot can miss until its next
refresh is storage of caches started, resized or ended since it was taken, and events whose
``occurred_at`` lies more than :data:`LATE_EVENT_WINDOW` before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.billing.invoices import period_of
from kvaas.billing.pricebook import PriceBook, pricebook_for
from kvaas.billing.pricing import price_usage
from kvaas.config import Settings
from kvaas.db.base import utcnow
from kvaas.db.models import Budget, BudgetAlert, Tenant, UsageEvent
from kvaas.db.upsert import insert_ignore
from kvaas.errors import APIError
from kvaas.metering.ledger import EVENT_METERS
from kvaas.metering.storage import Segment, Usage, epoch_s, integrate, load_segments

THRESHOLDS = (80, 100)
#: A tenant's month-to-date snapshot is computed afresh once it is this old (seconds).
SPEND_REFRESH_SECONDS = 60
#: Events recorded after a snapshot are looked for among those that occurred at most this long
#: before it (the ledger's index is by time); older late events count from the next refresh.
LATE_EVENT_WINDOW = timedelta(hours=1)
#: Most tenants whose snapshot one process keeps (the oldest is dropped beyond).
MAX_TRACKED_TENANTS = 10_000


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


# --- month-to-date spend ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Snapshot:
    """A tenant's meters from its month's start up to ``taken_at``."""

    start: datetime
    taken_at: datetime
    segments: list[Segment]
    events: dict[str, int]
    last_event_id: int  # the highest usage-event id counted in ``events`` (0: none)


async def _event_sums(
    session: AsyncSession, tenant_id: str, since: datetime, until: datetime, after_id: int = 0
) -> tuple[dict[str, int], int]:
    """Σ quantity per token meter of the tenant's events with ``since <= occurred_at < until``
    and ``id > after_id``, and the highest id among them (``after_id`` when none)."""
    sums = dict.fromkeys(EVENT_METERS, 0)
    last = after_id
    rows = await session.execute(
        select(UsageEvent.meter, func.sum(UsageEvent.quantity), func.max(UsageEvent.id))
        .where(
            UsageEvent.tenant_id == tenant_id,
            UsageEvent.occurred_at >= since,
            UsageEvent.occurred_at < until,
            UsageEvent.id > after_id,
        )
        .group_by(UsageEvent.meter)
    )
    for meter, total, top in rows:
        if meter in sums:
            sums[meter] += int(total or 0)
        last = max(last, int(top or 0))
    return sums, last


async def _take_snapshot(session: AsyncSession, tenant_id: str, now: datetime) -> _Snapshot:
    start = month_start(now)
    segments, _ = await load_segments(session, tenant_id, start, now)
    events, last = await _event_sums(session, tenant_id, start, now)
    return _Snapshot(start, now, segments, events, last)


def _price(snap: _Snapshot, events: dict[str, int], now: datetime, pricebook: PriceBook) -> int:
    """What the month's meters up to ``now`` cost (minor units), priced like an invoice."""
    totals = integrate(snap.segments, epoch_s(snap.start), epoch_s(now))
    usage = Usage(
        start=snap.start,
        end=now,
        storage_token_seconds=totals.token_seconds,
        stored_byte_seconds=totals.byte_seconds,
        per_cache=totals.per_cache,
        prefill_tokens=events["prefill_tokens"],
        cached_tokens=events["cached_tokens"],
        output_tokens=events["output_tokens"],
        cache_creations=events["cache_creations"],
    )
    lines = price_usage(usage, pricebook.version_for(snap.start), pricebook.minor_units)
    return sum(line.amount_minor for line in lines)


class MonthToDate:
    """Running month-to-date spend per tenant, kept by one process (see the module text).

    :meth:`exact` computes the spend in full and keeps the result as the tenant's snapshot;
    :meth:`running` reuses a snapshot younger than ``refresh_seconds`` from the same month and
    adds the usage events recorded since.
    """

    def __init__(
        self,
        refresh_seconds: float = SPEND_REFRESH_SECONDS,
        max_tenants: int = MAX_TRACKED_TENANTS,
    ) -> None:
        self.refresh = timedelta(seconds=refresh_seconds)
        self.max_tenants = max_tenants
        self._snapshots: dict[str, _Snapshot] = {}

    async def exact(
        self, session: AsyncSession, tenant_id: str, pricebook: PriceBook, now: datetime
    ) -> int:
        """The spend from the start of ``now``'s month to ``now``, computed in full."""
        snap = await _take_snapshot(session, tenant_id, now)
        self._keep(tenant_id, snap)
        return _price(snap, snap.events, now, pricebook)

    async def running(
        self, session: AsyncSession, tenant_id: str, pricebook: PriceBook, now: datetime
    ) -> int:
        """The spend up to ``now`` from the tenant's snapshot and the events since it; a full
        computation (:meth:`exact`) when the snapshot is missing, stale or of another month."""
        snap = self._snapshots.get(tenant_id)
        if (
            snap is None
            or snap.start != month_start(now)
            or not timedelta(0) <= now - snap.taken_at < self.refresh
        ):
            return await self.exact(session, tenant_id, pricebook, now)
        since = max(snap.start, snap.taken_at - LATE_EVENT_WINDOW)
        new, _ = await _event_sums(session, tenant_id, since, now, snap.last_event_id)
        events = {m: snap.events[m] + new[m] for m in EVENT_METERS}
        return _price(snap, events, now, pricebook)

    def _keep(self, tenant_id: str, snap: _Snapshot) -> None:
        self._snapshots.pop(tenant_id, None)
        while len(self._snapshots) >= self.max_tenants:
            del self._snapshots[next(iter(self._snapshots))]
        self._snapshots[tenant_id] = snap


#: This process's running totals, read by :func:`check_create_allowed`.
MONTH_TO_DATE = MonthToDate()


async def month_spend(
    session: AsyncSession, tenant_id: str, pricebook: PriceBook, now: datetime
) -> int:
    """What the tenant's usage from the start of ``now``'s month to ``now`` costs (minor
    units), priced exactly like an invoice."""
    return await MONTH_TO_DATE.exact(session, tenant_id, pricebook, now)


# --- budgets ------------------------------------------------------------------------------------
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


async def _status(
    session: AsyncSession,
    tenant_id: str,
    budget: Budget | None,
    spend: int,
    pricebook: PriceBook,
    now: datetime,
) -> BudgetStatus:
    """The status for ``spend``, recording the thresholds it crosses."""
    month = period_of(now)
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


async def evaluate_budget(
    session: AsyncSession, tenant_id: str, pricebook: PriceBook, now: datetime | None = None
) -> BudgetStatus:
    """Spend this month (exact), the budget, and the thresholds crossed (recording new
    crossings)."""
    now = now or utcnow()
    budget = await session.get(Budget, tenant_id)
    spend = await month_spend(session, tenant_id, pricebook, now)
    return await _status(session, tenant_id, budget, spend, pricebook, now)


async def set_budget(
    session: AsyncSession, tenant_id: str, amount_minor: int, currency: str
) -> Budget:
    """Set (or replace) the tenant's monthly budget and commit."""
    budget = await session.get(Budget, tenant_id)
    if budget is None:
        budget = Budget(
            tenant_id=tenant_id, amount_minor=amount_minor, currency=currency, updated_at=utcnow()
        )
        session.add(budget)
    else:
        budget.amount_minor = amount_minor
        budget.currency = currency
    await session.commit()
    return budget


async def check_create_allowed(
    session: AsyncSession,
    tenant: Tenant,
    settings: Settings,
    *,
    now: datetime | None = None,
) -> BudgetStatus | None:
    """Call before creating a cache. None when the tenant has no budget (nothing computed);
    otherwise the budget status at the running month-to-date spend (:class:`MonthToDate`),
    after recording any threshold crossed. Raises :class:`BudgetExceeded` (402) at or above
    100 % when ``settings.budget_hard_limit``."""
    budget = await session.get(Budget, tenant.id)
    if budget is None:
        return None
    now = now or utcnow()
    pricebook = pricebook_for(settings.pricebook_path)
    spend = await MONTH_TO_DATE.running(session, tenant.id, pricebook, now)
    status = await _status(session, tenant.id, budget, spend, pricebook, now)
    if settings.budget_hard_limit and status.exhausted:
        raise BudgetExceeded(
            f"the monthly budget of {pricebook.format(budget.amount_minor)} is spent "
            f"({pricebook.format(status.spend_minor)} so far in {status.month}); "
            "raise it with PUT /v1/budget",
            extra={"budget_minor": budget.amount_minor, "spend_minor": status.spend_minor},
        )
    return status
