"""Bodies of the ``/v1/budget`` routes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvaas.billing.money import MAX_MINOR


class BudgetIn(BaseModel):
    """Exactly one of ``amount_minor`` (integer minor units) or ``amount`` (decimal string)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"amount": "250.00", "currency": "USD"}]}
    )
    amount_minor: int | None = Field(
        None, ge=0, le=MAX_MINOR, description="Budget in minor units (cents)."
    )
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
