"""The operators' dashboard under ``/admin``: server-rendered pages (Jinja2), htmx for the
parts that refresh, Chart.js for the charts; both libraries are vendored under ``static/``.

:func:`mount` adds the pages and the static files to an application that serves the admin
API. Pages need a session (log in with the admin token at ``/admin/login``); without one a
page redirects to the login page, while ``/admin/api`` keeps answering 401/403.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from kvaas.dashboard import caches, invoices, login, overview, system, tenants
from kvaas.dashboard.auth import CsrfRejected, LoginRequired, session_of
from kvaas.dashboard.render import HERE, page

STATIC_PATH = "/admin/static"


async def _login_required(request: Request, exc: Exception) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    location = "/admin/login"
    if request.method == "GET" and target not in ("/admin", "/admin/"):
        location += "?next=" + quote(target, safe="/")
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303)


async def _csrf_rejected(request: Request, exc: Exception) -> Response:
    return page(
        request,
        "error.html",
        session_of(request),
        status_code=403,
        title="Refused",
        message="The form was sent without this session's CSRF token: reload the page and "
        "try again.",
        back=request.headers.get("referer", "/admin")
        if request.headers.get("referer", "").startswith(str(request.base_url))
        else "/admin",
    )


async def close_memos(app: FastAPI) -> None:
    """Stop the aggregates still being computed in the background (before the database
    closes)."""
    for memo in (getattr(app.state, "dashboard_memos", None) or {}).values():
        await memo.close()


def _closing_memos(lifespan: Any) -> Any:
    @asynccontextmanager
    async def wrapped(app: FastAPI) -> AsyncIterator[Any]:
        async with lifespan(app) as state:
            try:
                yield state
            finally:
                await close_memos(app)

    return wrapped


def mount(app: FastAPI) -> None:
    """Serve the dashboard from ``app`` (pages, their static files, the login redirect); its
    background computations stop when the application's lifespan ends."""
    app.router.lifespan_context = _closing_memos(app.router.lifespan_context)
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(CsrfRejected, _csrf_rejected)
    for module in (login, overview, tenants, caches, invoices, system):
        app.include_router(module.router)
    app.mount(STATIC_PATH, StaticFiles(directory=HERE / "static"), name="dashboard-static")
