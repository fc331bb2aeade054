"""Log in with the admin token, log out."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kvaas.dashboard import auth
from kvaas.dashboard.deps import Operator, redirect, settings_of
from kvaas.dashboard.render import page
from kvaas.metrics import AUTH_FAILURES

router = APIRouter(prefix="/admin", include_in_schema=False)
log = logging.getLogger("kvaas.dashboard")


def _next(target: str | None) -> str:
    """Where to go after logging in: a dashboard path, never another site."""
    safe = target and target.startswith("/admin") and not target.startswith("/admin/api")
    if safe and target and "//" not in target and "\\" not in target:
        return target
    return "/admin"


def _login_page(
    request: Request, *, error: str | None, status_code: int, target: str | None = None
) -> Response:
    """The login form; ``target``: where to go after logging in (default: the ``next``
    query parameter), kept across a failed attempt."""
    settings = settings_of(request)
    token = auth.login_csrf(request)
    response = page(
        request,
        "login.html",
        None,
        status_code=status_code,
        login_csrf=token,
        error=error,
        next=_next(target or request.query_params.get("next")),
        enabled=bool(auth.admin_token(settings)),
    )
    auth.set_login_cookie(response, request, settings, token)
    return response


@router.get("/login")
async def dashboard_login_form(request: Request) -> Response:
    if auth.session_of(request) is not None:
        return redirect(_next(request.query_params.get("next")))
    return _login_page(request, error=None, status_code=200)


@router.post("/login")
async def dashboard_login(request: Request) -> Response:
    """Check the admin token (401 for a wrong one: the address guard counts it like a wrong
    token on the admin API) and the login form's CSRF token (403); then set the session
    cookie and go on."""
    settings = settings_of(request)
    form = await auth.form_of(request)
    cookie = request.cookies.get(auth.LOGIN_COOKIE, "")
    given = form.get(auth.CSRF_FIELD, "")
    if not cookie or not given or not auth.same(given, cookie):
        return _login_page(
            request,
            error="The form expired or was not sent from this page; try again.",
            status_code=403,
            target=form.get("next"),
        )
    if not auth.admin_token(settings):
        return _login_page(
            request,
            error="The dashboard is off: set KVAAS_ADMIN_TOKEN to enable it.",
            status_code=403,
        )
    if not auth.check_token(settings, form.get("token", "")):
        AUTH_FAILURES.labels("admin").inc()
        return _login_page(
            request,
            error="That is not the admin token.",
            status_code=401,
            target=form.get("next"),
        )
    value, _session = auth.new_cookie(settings)
    response = redirect(_next(form.get("next")))
    auth.set_session_cookie(response, request, settings, value)
    response.delete_cookie(auth.LOGIN_COOKIE, path=auth.COOKIE_PATH)
    log.info("dashboard login from %s", request.client.host if request.client else "unknown")
    return response


@router.post("/logout")
async def dashboard_logout(request: Request, operator: Operator) -> Response:
    response = redirect("/admin/login")
    auth.clear_session_cookie(response, request, settings_of(request))
    return response
