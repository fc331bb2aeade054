"""Turning meters into priced invoice lines (pure functions, no database).

Each line: ``quantity`` = usage - free tier (meter units), ``unit_quantity`` = quantity in the
price's unit (1M token-hours, 1M tokens, caches), ``amount`` = unit_quantity * unit_price
exactly, then rounded once, half up, to the minor unit (``amount_minor``). The invoice total
is the sum of the rounded lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kvaas.billing.pricebook import (
    SECONDS_PER_HOUR,
    STORAGE_CLASSES,
    TOKENS_PER_MTOK,
    PriceVersion,
    to_minor,
)
from kvaas.metering.storage import Usage

TOKEN_SECONDS_PER_UNIT = TOKENS_PER_MTOK * SECONDS_PER_HOUR  # 1M token-hours


@dataclass
class PricedLine:
    meter: str
    storage_class: str | None
    description: str
    usage_quantity: int
    free_quantity: int
    quantity: int
    unit: str
    unit_quantity: Decimal
    unit_price: Decimal
    amount: Decimal
    amount_minor: int
    usage_ref: dict[str, Any] = field(default_factory=dict)


def _line(
    meter: str,
    storage_class: str | None,
    description: str,
    usage_q: int,
    free_q: int,
    per_unit: int,
    unit: str,
    price: Decimal,
    minor_units: int,
) -> PricedLine:
    free = min(usage_q, free_q)
    qty = usage_q - free
    unit_q = Decimal(qty) / Decimal(per_unit)
    amount = Decimal(qty) * price / Decimal(per_unit)
    return PricedLine(
        meter=meter,
        storage_class=storage_class,
        description=description,
        usage_quantity=usage_q,
        free_quantity=free,
        quantity=qty,
        unit=unit,
        unit_quantity=unit_q,
        unit_price=price,
        amount=amount,
        amount_minor=to_minor(amount, minor_units),
    )


def storage_amount(token_seconds: int, price_per_mtok_hour: Decimal) -> Decimal:
    """Exact (unrounded) price of ``token_seconds`` of storage."""
    return Decimal(token_seconds) * price_per_mtok_hour / Decimal(TOKEN_SECONDS_PER_UNIT)


def price_usage(usage: Usage, prices: PriceVersion, minor_units: int) -> list[PricedLine]:
    """Invoice lines for ``usage`` at ``prices``: one per meter with usage, in a fixed order
    (storage per class, prefill, cached reads, output, creations, minimum charges)."""
    lines: list[PricedLine] = []
    free = prices.free_tier
    for cls in STORAGE_CLASSES:
        ts = usage.storage_token_seconds.get(cls, 0)
        if ts:
            lines.append(
                _line(
                    "storage_token_seconds",
                    cls,
                    f"Storage, {cls} class",
                    ts,
                    free.storage_token_hours.get(cls, 0) * SECONDS_PER_HOUR,
                    TOKEN_SECONDS_PER_UNIT,
                    "1M token-hours",
                    prices.storage_per_mtok_hour.of(cls),
                    minor_units,
                )
            )
    for meter, desc, price, free_q in (
        ("prefill_tokens", "Prefilled tokens", prices.prefill_per_mtok, free.prefill_tokens),
        ("cached_tokens", "Cached tokens read", prices.cached_read_per_mtok, free.cached_tokens),
        ("output_tokens", "Output tokens", prices.output_per_mtok, free.output_tokens),
    ):
        q = usage.meter(meter)
        if q:
            lines.append(
                _line(
                    meter, None, desc, q, free_q, TOKENS_PER_MTOK, "1M tokens", price, minor_units
                )
            )
    if usage.cache_creations and prices.cache_creation:
        lines.append(
            _line(
                "cache_creations",
                None,
                "Caches created",
                usage.cache_creations,
                0,
                1,
                "cache",
                prices.cache_creation,
                minor_units,
            )
        )
    minimum = prices.minimum_charge_per_cache
    if minimum:
        per_cache: dict[str, Decimal] = {}
        for (cache_id, cls), ts in usage.per_cache.items():
            cost = storage_amount(ts, prices.storage_per_mtok_hour.of(cls))
            per_cache[cache_id] = per_cache.get(cache_id, Decimal(0)) + cost
        topped = {cid: minimum - c for cid, c in sorted(per_cache.items()) if c < minimum}
        if topped:
            amount = sum(topped.values(), Decimal(0))
            lines.append(
                PricedLine(
                    meter="minimum_charge",
                    storage_class=None,
                    description=f"Minimum storage charge per cache ({len(topped)} caches)",
                    usage_quantity=len(topped),
                    free_quantity=0,
                    quantity=len(topped),
                    unit="cache",
                    unit_quantity=Decimal(len(topped)),
                    unit_price=minimum,
                    amount=amount,
                    amount_minor=to_minor(amount, minor_units),
                    usage_ref={"caches": sorted(topped)},
                )
            )
    return lines
