"""Bodies of the liveness and readiness probes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ComponentStatus(BaseModel):
    status: Literal["ok", "degraded", "down"] = Field(
        description="`degraded`: serving with less capacity than configured (some remote "
        "engine nodes down or refused)."
    )
    detail: str | None = None
    latency_ms: float


class Readiness(BaseModel):
    status: Literal["ok", "degraded", "down"] = Field(
        description="`down` (HTTP 503) when any component is down; `degraded` (HTTP 200) when "
        "one serves with reduced capacity."
    )
    version: str
    components: dict[str, ComponentStatus] = Field(
        description="Each checked component: database, redis when configured, engine when loaded."
    )


class Liveness(BaseModel):
    status: Literal["ok", "down"] = Field(
        "ok",
        description="`down` (HTTP 503) when the process cannot recover by itself and must be "
        "restarted: its in-process engine died and could not be restarted.",
    )
    version: str
    engine: Literal["ok", "recovering", "down", "none"] = Field(
        "none",
        description="The engine: `recovering` while it cannot serve but comes back without a "
        "restart of the gateway (the in-process engine restarting after it died, or every "
        "remote node down; requests get 503 `engine_unavailable` meanwhile), `down` when "
        "only a restart of the gateway helps, `none` without an engine.",
    )
