"""Dashboard sessions: log in with the admin token, then a signed, expiring cookie.

The cookie holds ``<payload>.<signature>``: the payload is a random session id and its expiry
(JSON, base64url), the signature an HMAC-SHA256 under a key derived from the admin token, so
changing the token ends every session. It is ``HttpOnly``, ``SameSite=Strict``, scoped to
``/admin`` and ``Secure`` over HTTPS (or when ``dashboard_secure_cookie`` says so).

Every form carries a CSRF token: an HMAC of the session id under the same key. The login form,
which has no session yet, uses a double-submit token (a random value in a short-lived cookie
and in the form). Both are checked with constant-time comparisons.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import Response

from kvaas.config import Settings

COOKIE = "kvaas_admin"
LOGIN_COOKIE = "kvaas_admin_login"
COOKIE_PATH = "/admin"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
LOGIN_CSRF_SECONDS = 900


class LoginRequired(Exception):
    """Raised by :func:`require_session`: the request has no valid session (answered with a
    redirect to the login page)."""


class CsrfRejected(Exception):
    """A form posted without the session's CSRF token (answered 403)."""


@dataclass(frozen=True)
class DashboardSession:
    """A logged-in operator: the session id, when it expires and its CSRF token."""

    sid: str
    expires: int
    csrf: str


def same(given: str, expected: str) -> bool:
    """Constant-time equality of two texts, compared as UTF-8 bytes (so any text given is
    just a mismatch: ``hmac.compare_digest`` refuses non-ASCII ``str``)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def admin_token(settings: Settings) -> bytes:
    """The configured admin token (empty when unset or blank: the dashboard is off)."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    return token.strip().encode()


def signing_key(settings: Settings) -> bytes:
    """The key sessions and CSRF tokens are signed with, derived from the admin token."""
    return hmac.new(admin_token(settings), b"kvaas-dashboard-session-v1", hashlib.sha256).digest()


def _sign(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())


def csrf_for(key: bytes, sid: str) -> str:
    """The CSRF token of session ``sid``."""
    return _b64(hmac.new(key, f"csrf:{sid}".encode(), hashlib.sha256).digest())


def check_token(settings: Settings, given: str) -> bool:
    """Whether ``given`` is the admin token (constant time; never true when it is unset)."""
    expected = admin_token(settings)
    return bool(expected) and hmac.compare_digest(
        given.strip().encode("utf-8", "replace"), expected
    )


def new_cookie(settings: Settings, now: float | None = None) -> tuple[str, DashboardSession]:
    """A fresh session and the cookie value that carries it."""
    key = signing_key(settings)
    sid = secrets.token_urlsafe(18)
    expires = int(now if now is not None else time.time()) + settings.dashboard_session_seconds
    payload = _b64(json.dumps({"sid": sid, "exp": expires}, separators=(",", ":")).encode())
    return f"{payload}.{_sign(key, payload)}", DashboardSession(sid, expires, csrf_for(key, sid))


def read_cookie(
    settings: Settings, value: str | None, now: float | None = None
) -> DashboardSession | None:
    """The session in ``value`` if its signature verifies and it has not expired."""
    if not value or not admin_token(settings):
        return None
    payload, _, sig = value.partition(".")
    key = signing_key(settings)
    if not sig or not same(sig, _sign(key, payload)):
        return None
    try:
        data = json.loads(_unb64(payload))
        sid, expires = str(data["sid"]), int(data["exp"])
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    if expires <= int(now if now is not None else time.time()):
        return None
    return DashboardSession(sid, expires, csrf_for(key, sid))


def _secure(request: Request, settings: Settings) -> bool:
    return settings.dashboard_secure_cookie or request.url.scheme == "https"


def set_session_cookie(
    response: Response, request: Request, settings: Settings, value: str
) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=settings.dashboard_session_seconds,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request, settings),
    )


def clear_session_cookie(response: Response, request: Request, settings: Settings) -> None:
    response.delete_cookie(
        COOKIE,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request, settings),
    )


def login_csrf(request: Request) -> str:
    """The login form's double-submit token: the one in the request's cookie, or a new one."""
    current = request.cookies.get(LOGIN_COOKIE, "")
    return current if len(current) >= 22 else secrets.token_urlsafe(24)


def set_login_cookie(response: Response, request: Request, settings: Settings, token: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=LOGIN_CSRF_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request, settings),
    )


async def form_of(request: Request) -> dict[str, str]:
    """The request's url-encoded form (first value of each field)."""
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def session_of(request: Request) -> DashboardSession | None:
    settings: Settings = request.app.state.settings
    return read_cookie(settings, request.cookies.get(COOKIE))


async def require_session(request: Request) -> DashboardSession:
    """The request's session, or :class:`LoginRequired`. For state-changing methods the CSRF
    token (form field ``csrf_token`` or header ``X-CSRF-Token``) must match the session's,
    else :class:`CsrfRejected`."""
    session = session_of(request)
    if session is None:
        raise LoginRequired()
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        given = request.headers.get(CSRF_HEADER)
        if given is None and request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            given = (await form_of(request)).get(CSRF_FIELD)
        if not given or not same(given, session.csrf):
            raise CsrfRejected()
    return session
