"""Refusing a tenant's excess engine requests before the application reads them.

A tenant far over its limits sends many requests that the engine's fair gate refuses
(``429 engine_busy``, :meth:`kvaas.services.fairness.FairGate.admit`). Each of them would
otherwise be routed, authenticated, validated and answered by the application, in the process
that also serves every other tenant. :class:`EngineAdmissionMiddleware` answers such a request
before any of that, with the same error, when all of these hold:

- it is bound for a route that runs the engine (a route declaring ``engine_work()``; the
  middleware reads the application's routes, so no path is listed twice);
- its bearer credential authenticated within the last ``KVAAS_AUTH_CACHE_SECONDS``
  (:class:`kvaas.auth.cache.AuthCache`: no database lookup is made here, and a credential the
  cache does not know goes on to the application, which authenticates it);
- the key holds the scope the route declares (otherwise the application answers ``403``);
- the gate would refuse its tenant now (:meth:`~kvaas.services.fairness.FairGate.refusal`).

The body is not read. Anything else passes through untouched, and the refusal is the one the
application's own admission would give (the same rule, :meth:`FairGate.refusal`), only sooner.
"""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from kvaas.api.asgi import error_response_messages, header
from kvaas.api.deps import route_auth, runs_engine
from kvaas.auth.resolver import bearer_credential


class EngineAdmissionMiddleware:
    """Answers ``429 engine_busy`` early for a known key whose tenant's gate is full."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: list[APIRoute] | None = None

    def _engine_routes(self, application: Any) -> list[APIRoute]:
        if self._routes is None:  # read once, on the first request: every route is there
            self._routes = [r for r in application.routes if runs_engine(r)]
        return self._routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            refused = self._refusal(scope)
            if refused is not None:
                for message in refused:
                    await send(message)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> list[Any] | None:
        application = scope.get("app")
        state = getattr(application, "state", None)
        cache = getattr(state, "auth_cache", None)
        service = getattr(state, "cache_service", None)
        if cache is None or service is None:
            return None
        credential = bearer_credential(header(scope, b"authorization"))
        known = cache.get(credential) if credential is not None else None
        if known is None:
            return None
        err = service.gate.refusal(known.tenant.id)
        if err is None:
            return None
        route = next(
            (r for r in self._engine_routes(application) if r.matches(scope)[0] == Match.FULL),
            None,
        )
        if route is None:
            return None
        _, requirements = route_auth(route)
        if not all(q.scope is None or known.has_scope(q.scope) for q in requirements):
            return None  # the application answers 403: a refusal never hides a missing scope
        return error_response_messages(scope, err)
