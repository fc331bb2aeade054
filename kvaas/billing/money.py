"""Amounts of money as the API reads and writes them.

Amounts are exact :class:`~decimal.Decimal` values; on the wire they are decimal strings in
plain notation (never an exponent) or integers in the currency's minor unit.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from kvaas.billing.pricebook import from_minor
from kvaas.errors import BadRequest


def format_amount(amount: Decimal) -> str:
    """``amount`` in plain notation, every digit kept (``Decimal("1E+1")`` → ``"10"``)."""
    return format(amount, "f")


def format_minor(minor: int, minor_units: int) -> str:
    """An amount in minor units as a decimal string in major units (``12345, 2`` → ``"123.45"``)."""
    return str(from_minor(minor, minor_units))


def parse_minor(text: str, minor_units: int, *, param: str = "amount") -> int:
    """A non-negative decimal string with at most ``minor_units`` decimals, in minor units
    (``"1.5", 2`` → ``150``). ``400`` naming ``param`` otherwise: not a number, negative,
    infinite or NaN, or finer than the minor unit."""
    try:
        amount = Decimal(text)
    except InvalidOperation as e:
        raise BadRequest(f"not a decimal amount: {text!r}", param=param) from e
    minor = amount.scaleb(minor_units)
    if not amount.is_finite() or amount < 0 or minor != minor.to_integral_value():
        raise BadRequest(
            f"amount must be >= 0 with at most {minor_units} decimals",
            param=param,
        )
    return int(minor)
