"""Every endpoint and dependency of the gateway runs on the event loop.

FastAPI runs a plain ``def`` endpoint or dependency in its thread pool: one thread hop per
call per request, each a wake-up that a busy machine delays, for what is an attribute read.
The gateway's overhead on an attach is measured in milliseconds (``bench/ttft_http.py``), so
none may slip in.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi.routing import APIRoute

from kvaas.api.deps import _calls as dependency_calls
from kvaas.app import create_admin_app, create_app
from kvaas.config import Settings


def _runs_on_the_loop(call: Any) -> bool:
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        return True
    dunder = inspect.getattr_static(type(call), "__call__", None)  # a dependency object
    return not inspect.isfunction(call) and (
        inspect.iscoroutinefunction(dunder) or inspect.isasyncgenfunction(dunder)
    )


def _threaded(app: Any) -> list[str]:
    out = []
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        if not _runs_on_the_loop(route.endpoint):
            out.append(f"{route.path}: endpoint {route.endpoint.__qualname__}")
        out += [
            f"{route.path}: {getattr(c, '__qualname__', repr(c))}"
            for c in dependency_calls(route.dependant)
            if not _runs_on_the_loop(c)
        ]
    return out


def test_no_route_of_either_app_runs_a_thread_hop(tmp_path: Any) -> None:
    settings = Settings(_env_file=None, engine="none", data_dir=tmp_path)  # type: ignore[call-arg]
    api, admin = create_app(settings), create_admin_app(settings)
    routes = [r for app in (api, admin) for r in app.routes if isinstance(r, APIRoute)]
    assert len(routes) > 40  # the whole surface, the dashboard's pages included
    assert _threaded(api) == [] and _threaded(admin) == []


def test_the_check_sees_a_plain_function_dependency(tmp_path: Any) -> None:
    from fastapi import Depends, FastAPI

    def plain() -> int:
        return 1

    app = FastAPI()

    @app.get("/x")
    async def x(v: int = Depends(plain)) -> int:
        return v

    assert _threaded(app) == ["/x: test_the_check_sees_a_plain_function_dependency.<locals>.plain"]
