"""Bodies of the liveness and readiness probes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ComponentStatus(BaseModel):
    status: Literal["ok", "down"]
    detail: str | None = None
    latency_ms: float


class Readiness(BaseModel):
    status: Literal["ok", "down"]
    version: str
    components: dict[str, ComponentStatus] = Field(
        description="Each checked component: database, redis when configured, engine when loaded."
    )


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
