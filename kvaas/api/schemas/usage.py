"""Bodies of the ``/v1/usage`` routes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class Meters(BaseModel):
    storage_token_seconds: dict[str, int] = Field(
        description="Tokens x seconds stored, per storage class (exact, per second)."
    )
    prefill_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cache_creations: int = 0


class UsageBucket(Meters):
    start: datetime
    end: datetime


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    start: datetime = Field(serialization_alias="from")
    end: datetime = Field(serialization_alias="to")
    granularity: Literal["hour", "day"]
    totals: Meters
    buckets: list[UsageBucket]


class UsageEventOut(BaseModel):
    id: str = Field(
        description="Opaque id (`ue_…`); pass it as `after` for the events recorded after it."
    )
    meter: str
    quantity: int
    occurred_at: datetime
    cache_id: str | None
    details: dict[str, Any]


class UsageEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageEventOut]
    has_more: bool
