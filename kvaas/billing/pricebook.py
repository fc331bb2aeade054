"""The price book: a versioned YAML file (``billing/pricebook.yaml``) validated with pydantic.

Money is :class:`~decimal.Decimal` (never float) until an invoice line is rounded, once, half
up, to the currency's minor unit (:func:`to_minor`).
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from kvaas.resources import packaged_dir

STORAGE_CLASSES = ("hot", "standard", "cold")
TOKENS_PER_MTOK = 1_000_000
SECONDS_PER_HOUR = 3600


def _decimal(v: Any) -> Decimal:
    if isinstance(v, bool):
        raise ValueError("a price must be a number, not a boolean")
    if isinstance(v, float):
        v = repr(v)  # YAML floats: keep the written digits
    try:
        d = Decimal(str(v).strip())
    except Exception as e:
        raise ValueError(f"not a decimal amount: {v!r}") from e
    if not d.is_finite() or d < 0:
        raise ValueError(f"a price must be a finite amount >= 0, got {v!r}")
    return d


Price = Annotated[Decimal, BeforeValidator(_decimal)]


class PriceBookError(ValueError):
    """The price book is missing or invalid; the message names the file and the field."""


class FreeTier(BaseModel):
    """Usage per tenant and invoice period that is not charged (meter units)."""

    model_config = ConfigDict(extra="forbid")
    prefill_tokens: int = Field(0, ge=0)
    cached_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    storage_token_hours: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _classes(self) -> FreeTier:
        bad = set(self.storage_token_hours) - set(STORAGE_CLASSES)
        if bad:
            raise ValueError(f"unknown storage class {sorted(bad)}; expected {STORAGE_CLASSES}")
        return self


class StoragePrices(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hot: Price
    standard: Price
    cold: Price

    def of(self, storage_class: str) -> Decimal:
        return getattr(self, storage_class)


class PriceVersion(BaseModel):
    """Prices in force from ``effective_from`` until the next version's date."""

    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, max_length=32)
    effective_from: date
    storage_per_mtok_hour: StoragePrices
    prefill_per_mtok: Price
    cached_read_per_mtok: Price
    output_per_mtok: Price
    cache_creation: Price = Decimal(0)
    minimum_charge_per_cache: Price = Decimal(0)
    free_tier: FreeTier = Field(default_factory=FreeTier)


class PriceBook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    minor_units: int = Field(2, ge=0, le=4)
    versions: list[PriceVersion] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> PriceBook:
        dates = [v.effective_from for v in self.versions]
        if dates != sorted(dates) or len(set(dates)) != len(dates):
            raise ValueError("versions must be listed by strictly increasing effective_from")
        names = [v.version for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError("version names must be unique")
        return self

    def version_for(self, at: datetime | date) -> PriceVersion:
        """The version in force on ``at`` (the latest ``effective_from`` on or before it)."""
        day = at.date() if isinstance(at, datetime) else at
        found = [v for v in self.versions if v.effective_from <= day]
        if not found:
            raise PriceBookError(
                f"no price book version is in force on {day} "
                f"(the first starts {self.versions[0].effective_from})"
            )
        return found[-1]

    def to_minor(self, amount: Decimal) -> int:
        return to_minor(amount, self.minor_units)

    def format(self, minor: int) -> str:
        """``1234`` → ``"12.34 USD"``."""
        return f"{from_minor(minor, self.minor_units)} {self.currency}"


def to_minor(amount: Decimal, minor_units: int) -> int:
    """Round ``amount`` half up to the minor unit and return it as an integer of minor units."""
    return int((amount * (Decimal(10) ** minor_units)).quantize(Decimal(1), ROUND_HALF_UP))


def from_minor(minor: int, minor_units: int) -> Decimal:
    return Decimal(minor).scaleb(-minor_units)


def billing_dir() -> Path:
    """``billing/`` of a source checkout, or the copy packaged inside a wheel."""
    return packaged_dir("billing", "pricebook.yaml")


def default_pricebook_path() -> Path:
    return billing_dir() / "pricebook.yaml"


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_pricebook(text: str, source: str = "price book") -> PriceBook:
    """Parse and validate price book YAML; :class:`PriceBookError` names the bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PriceBookError(f"{source}: not valid YAML: {e}") from e
    try:
        return PriceBook.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise PriceBookError(
            f"{source}: field `{_loc(tuple(first['loc']))}`: {first['msg']}"
            + (f" ({e.error_count()} errors)" if e.error_count() > 1 else "")
        ) from e


def load_pricebook(path: Path | None = None) -> PriceBook:
    """Load the price book at ``path`` (default: the packaged ``billing/pricebook.yaml``)."""
    path = path or default_pricebook_path()
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PriceBookError(f"{path}: cannot read the price book: {e}") from e
    return parse_pricebook(text, str(path))


@lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int) -> PriceBook:
    return load_pricebook(Path(path))


def pricebook_for(path: Path | None) -> PriceBook:
    """The price book at ``path``, loaded once per file version."""
    p = Path(path or default_pricebook_path()).resolve()
    return _cached(str(p), p.stat().st_mtime_ns if p.exists() else 0)
