"""Liveness, readiness and metrics endpoints.

Components register readiness probes on ``app.state.health_checks`` (name → async callable
returning a detail string, raising when the component is down; a
:class:`~kvaas.engine.Degraded` string when it serves with reduced capacity). ``/readyz`` runs
them all concurrently, each under a time limit, and answers 503 when any is down (``degraded``
stays 200).

``/healthz`` is liveness: 200 while the process can serve or recover by itself (an in-process
engine that died and is restarting, or remote nodes all down, say ``engine: recovering``), 503
when only restarting the process helps (the engine could not be restarted, or restarts are
off).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from kvaas import __version__
from kvaas.api.deps import HealthCheck, HealthChecksDep, SettingsDep, require_admin
from kvaas.api.schemas.health import ComponentStatus, Liveness, Readiness
from kvaas.engine import Degraded, Engine

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_SECONDS = 3.0

_admin_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="`Authorization: Bearer <admin token>`",
)


async def _is_admin(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
) -> bool:
    """Whether the caller presented the admin token; a wrong one is refused as on the admin
    API (401), no credential at all is the public view."""
    if credentials is None:
        return False
    await require_admin(request, settings, credentials)
    return True


async def _probe(check: HealthCheck, admin: bool) -> ComponentStatus:
    """One probe's outcome; a down component's error text only for ``admin``."""
    t0 = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check(), PROBE_TIMEOUT_SECONDS)
        status: Literal["ok", "degraded", "down"] = (
            "degraded" if isinstance(detail, Degraded) else "ok"
        )
    except TimeoutError:
        status, detail = "down", f"no answer within {PROBE_TIMEOUT_SECONDS:g} s"
    except Exception as e:
        text = getattr(e, "detail", None) or str(e)
        status, detail = "down", (text.splitlines() or [type(e).__name__])[0][:300]
    return ComponentStatus(
        status=status,
        detail=detail if admin or status != "down" else None,
        latency_ms=round((time.perf_counter() - t0) * 1000, 2),
    )


@router.get(
    "/healthz",
    summary="Liveness: the process is up, or can come back without a restart",
    response_model=Liveness,
    responses={503: {"model": Liveness, "description": "The process must be restarted."}},
)
async def healthz(request: Request) -> JSONResponse:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    state = engine.liveness() if engine is not None else "none"
    body = Liveness(status="down" if state == "down" else "ok", version=__version__, engine=state)
    return JSONResponse(body.model_dump(), status_code=503 if state == "down" else 200)


@router.get(
    "/readyz",
    summary="Readiness: every component the service needs answers",
    responses={503: {"model": Readiness, "description": "At least one component is down."}},
)
async def readyz(
    checks: HealthChecksDep, admin: Annotated[bool, Depends(_is_admin)]
) -> JSONResponse:
    names = list(checks)
    results = await asyncio.gather(*(_probe(checks[n], admin) for n in names))
    components = dict(zip(names, results, strict=True))
    states = {c.status for c in results}
    status: Literal["ok", "degraded", "down"] = (
        "down" if "down" in states else "degraded" if "degraded" in states else "ok"
    )
    body = Readiness(status=status, version=__version__, components=components)
    return JSONResponse(body.model_dump(), status_code=503 if status == "down" else 200)


@router.get(
    "/metrics",
    summary="Prometheus metrics in the text exposition format",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Metrics."}},
)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
