"""Amounts of money as the API reads and writes them.

Amounts are exact :class:`~decimal.Decimal` values; on the wire they are decimal strings in
plain notation (never an exponent) or integers in the currency's minor unit.
"""

from __future__ import annotations

import re
from decimal import Decimal

from kvaas.billing.pricebook import from_minor
from kvaas.errors import BadRequest

#: Largest amount the API takes, in major units (a trillion): far above any budget, far below
#: what the database's 64-bit integers hold in minor units.
MAX_MAJOR_DIGITS = 12
#: The largest amount in minor units for any currency the price book can name (<= 4 decimals).
MAX_MINOR = 10 ** (MAX_MAJOR_DIGITS + 4)


def format_amount(amount: Decimal) -> str:
    """``amount`` in plain notation, every digit kept (``Decimal("1E+1")`` → ``"10"``)."""
    return format(amount, "f")


def format_minor(minor: int, minor_units: int) -> str:
    """An amount in minor units as a decimal string in major units (``12345, 2`` → ``"123.45"``)."""
    return str(from_minor(minor, minor_units))


def parse_minor(text: str, minor_units: int, *, param: str = "amount") -> int:
    """A non-negative decimal string in plain notation with at most ``minor_units`` decimals and
    :data:`MAX_MAJOR_DIGITS` integer digits, in minor units (``"1.5", 2`` → ``150``); ``400``
    naming ``param`` otherwise. The format is checked before any arithmetic, so no input costs
    more than a short regular-expression match (no exponents: ``"1e300000"`` is refused, never
    expanded)."""
    frac_re = rf"(?:\.([0-9]{{1,{minor_units}}}))?" if minor_units else "()"
    m = re.fullmatch(rf"([0-9]{{1,{MAX_MAJOR_DIGITS}}}){frac_re}", text)
    if m is None:
        raise BadRequest(
            f"amount must be a plain decimal >= 0 with at most {MAX_MAJOR_DIGITS} digits before "
            f'the point and {minor_units} after it (e.g. "250.00")',
            param=param,
        )
    whole, frac = m.group(1), (m.group(2) or "").ljust(minor_units, "0")
    return int(whole + frac) if minor_units else int(whole)
