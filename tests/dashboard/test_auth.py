"""Dashboard sessions: login with the admin token, the cookie's attributes, signature and
expiry, CSRF on every form, logout; the admin API keeps answering 401/403."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from kvtest.dashboard import Dash, csrf_of
from kvtest.gateway import ADMIN_TOKEN, admin_headers, running_app
from pydantic import SecretStr

from kvaas.config import Settings
from kvaas.dashboard import auth
from kvaas.dashboard.auth import CSRF_FIELD

PAGES = [
    "/admin",
    "/admin/tenants",
    "/admin/caches",
    "/admin/invoices",
    "/admin/system",
    "/admin/overview/charts.json",
    "/admin/system/health",
]


async def test_pages_redirect_to_login_without_a_session(dash: Dash) -> None:
    for path in PAGES:
        r = await dash.client.get(path)
        assert r.status_code == 303, (path, r.status_code)
        assert r.headers["location"].startswith("/admin/login"), path
    r = await dash.client.get("/admin/tenants?q=a")
    assert r.headers["location"] == "/admin/login?next=/admin/tenants%3Fq%3Da"
    # htmx asks for a client-side redirect instead of following one
    r = await dash.client.get("/admin/system/health", headers={"HX-Request": "true"})
    assert r.headers["hx-redirect"].startswith("/admin/login")
    # the admin API still answers 401 (no token) and does not redirect
    r = await dash.client.get("/admin/api/tenants")
    assert r.status_code == 401
    r = await dash.client.post("/admin/tenants", data={"name": "x"})
    assert r.status_code == 303


async def test_a_wrong_token_is_refused_and_the_right_one_opens_a_session(dash: Dash) -> None:
    r = await dash.login("not-the-admin-token-0123456789abcdefghij")
    assert r.status_code == 401
    assert "not the admin token" in r.text
    assert auth.COOKIE not in dash.client.cookies
    r = await dash.client.get("/admin")
    assert r.status_code == 303

    r = await dash.login()
    assert r.status_code == 303 and r.headers["location"] == "/admin"
    cookie = next(
        h for h in r.headers.get_list("set-cookie") if h.startswith(f"{auth.COOKIE}=")
    ).lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "path=/admin" in cookie
    assert "max-age=28800" in cookie
    for path in PAGES:
        r = await dash.client.get(path)
        assert r.status_code == 200, (path, r.text[:500])
    r = await dash.client.get("/admin")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    # a session is not an admin-API credential
    assert (await dash.client.get("/admin/api/tenants")).status_code == 401


async def test_login_form_needs_its_own_csrf_token(dash: Dash) -> None:
    await dash.client.get("/admin/login")
    r = await dash.client.post("/admin/login", data={"token": ADMIN_TOKEN})
    assert r.status_code == 403
    r = await dash.client.post("/admin/login", data={"token": ADMIN_TOKEN, CSRF_FIELD: "x" * 32})
    assert r.status_code == 403
    assert auth.COOKIE not in dash.client.cookies


async def test_login_goes_back_only_to_dashboard_pages(dash: Dash) -> None:
    for target, expected in [
        ("/admin/caches?status=ready", "/admin/caches?status=ready"),
        ("//evil.example/admin", "/admin"),
        ("https://evil.example/", "/admin"),
        ("/admin/api/tenants", "/admin"),
        ("/admin\\\\evil.example", "/admin"),
    ]:
        dash.client.cookies.clear()
        form = await dash.client.get("/admin/login")
        r = await dash.client.post(
            "/admin/login",
            data={"token": ADMIN_TOKEN, CSRF_FIELD: csrf_of(form.text), "next": target},
        )
        assert r.headers["location"] == expected, target


async def test_a_form_without_the_csrf_token_is_refused(dash: Dash) -> None:
    await dash.login()
    r = await dash.client.post("/admin/tenants", data={"name": "no-csrf"})
    assert r.status_code == 403
    r = await dash.client.post("/admin/tenants", data={"name": "no-csrf", CSRF_FIELD: "forged"})
    assert r.status_code == 403
    r = await dash.client.get("/admin/api/tenants/no-csrf", headers=admin_headers())
    assert r.status_code == 404  # nothing was created
    r = await dash.post("/admin/tenants", {"name": "with-csrf"})
    assert r.status_code == 200
    r = await dash.client.get("/admin/api/tenants/with-csrf", headers=admin_headers())
    assert r.status_code == 200


async def test_another_sessions_csrf_token_is_refused(dash: Dash) -> None:
    await dash.login()
    mine = await dash.csrf()
    dash.client.cookies.clear()
    await dash.login()
    r = await dash.client.post("/admin/tenants", data={"name": "cross", CSRF_FIELD: mine})
    assert r.status_code == 403


async def test_a_tampered_or_expired_cookie_is_no_session(dash: Dash) -> None:
    settings: Settings = dash.app.state.settings
    value, session = auth.new_cookie(settings)
    assert auth.read_cookie(settings, value) == session
    payload, _, sig = value.partition(".")
    forged = auth._b64(b'{"sid":"x","exp":9999999999}')
    assert auth.read_cookie(settings, f"{forged}.{sig}") is None
    assert auth.read_cookie(settings, f"{payload}.{sig[:-2]}AA") is None
    assert auth.read_cookie(settings, "garbage") is None
    late = time.time() + settings.dashboard_session_seconds + 1
    assert auth.read_cookie(settings, value, now=late) is None
    # another admin token: every session ends
    other = settings.model_copy(update={"admin_token": SecretStr("z" * 40)})
    assert auth.read_cookie(other, value) is None
    dash.client.cookies.set(auth.COOKIE, f"{forged}.{sig}", domain="kvaas.test", path="/admin")
    assert (await dash.client.get("/admin")).status_code == 303


async def test_logout_ends_the_session(dash: Dash) -> None:
    await dash.login()
    token = await dash.csrf("/admin")
    r = await dash.client.post("/admin/logout", data={CSRF_FIELD: token})
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    assert auth.COOKIE not in dash.client.cookies
    assert (await dash.client.get("/admin")).status_code == 303


@pytest.mark.parametrize("configured", ["", "   "])
def test_no_admin_token_means_no_session(configured: str) -> None:
    settings = Settings.model_construct(
        admin_token=SecretStr(configured), dashboard_session_seconds=60
    )
    assert not auth.check_token(settings, "")
    assert not auth.check_token(settings, configured)
    assert auth.read_cookie(settings, "a.b") is None


async def test_a_failed_login_keeps_the_page_asked_for(dash: Dash) -> None:
    form = await dash.client.get("/admin/login?next=/admin/caches")
    r = await dash.client.post(
        "/admin/login",
        data={"token": "w" * 40, CSRF_FIELD: csrf_of(form.text), "next": "/admin/caches"},
    )
    assert r.status_code == 401
    kept = re.search(r'name="next" value="([^"]*)"', r.text)
    assert kept and kept.group(1) == "/admin/caches"
    r = await dash.client.post(
        "/admin/login",
        data={"token": ADMIN_TOKEN, CSRF_FIELD: csrf_of(r.text), "next": kept.group(1)},
    )
    assert r.headers["location"] == "/admin/caches"
    # a form rendered after creating a key sits at /keys: reloading it goes to the tenant
    r = await dash.client.get("/admin/tenants/acme/keys")
    assert r.status_code == 303 and r.headers["location"] == "/admin/tenants/acme"


async def test_guessing_the_token_is_limited_per_address(tmp_path: Path) -> None:
    """Wrong logins count against the address's budget of failed authentication, like wrong
    tokens on the admin API: once it is spent the address gets 429, even with the right one."""
    values = {
        "data_dir": tmp_path / "data",
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'kvaas.db'}",
        "admin_token": ADMIN_TOKEN,
        "unauth_rate_limit_per_second": 0.001,
        "unauth_rate_limit_burst": 3,
    }
    async with running_app(None, **values) as (app, client):
        form = await client.get("/admin/login")
        token = csrf_of(form.text)
        for _ in range(4):  # a burst of 3, then the failure that finds the bucket empty
            r = await client.post("/admin/login", data={"token": "w" * 40, CSRF_FIELD: token})
            assert r.status_code == 401
        r = await client.post("/admin/login", data={"token": ADMIN_TOKEN, CSRF_FIELD: token})
        assert r.status_code == 429
        assert (await client.get("/admin/login")).status_code == 429
        assert auth.COOKIE not in client.cookies
        assert app.state.settings.unauth_rate_limit_burst == 3


async def test_non_ascii_tokens_are_refused_not_errors(dash: Dash) -> None:
    """Cookies and form fields are compared in constant time as bytes: text outside ASCII is a
    mismatch (403, or no session), never a server error."""
    form = await dash.client.get("/admin/login")
    r = await dash.client.post("/admin/login", data={"token": ADMIN_TOKEN, CSRF_FIELD: "é" * 32})
    assert r.status_code == 403
    await dash.login()
    r = await dash.client.post("/admin/tenants", data={"name": "x", CSRF_FIELD: "é" * 43})
    assert r.status_code == 403
    value = dash.client.cookies[auth.COOKIE]
    payload, _, _sig = value.partition(".")
    dash.client.cookies.clear()
    raw = f"{auth.COOKIE}={payload}.\u00e9\u00e9".encode()
    assert (await dash.client.get("/admin", headers={"Cookie": raw})).status_code == 303
    assert auth.read_cookie(dash.app.state.settings, f"{payload}.ü") is None
    assert form.status_code == 200


async def test_odd_path_parameters_stay_inside_the_location(dash: Dash) -> None:
    """A tenant or cache reference is quoted where it goes back into a redirect: line breaks
    and slashes cannot add headers or leave the page."""
    await dash.login()
    token = await dash.csrf()
    for path in (
        "/admin/tenants/a%0d%0aSet-Cookie:%20x=1/limits",
        "/admin/caches/a%0d%0aX-Evil:%201/ttl",
    ):
        r = await dash.client.post(path, data={CSRF_FIELD: token, "ttl_seconds": "100"})
        assert r.status_code in (404, 422), (path, r.status_code)
        assert "x=1" not in r.headers.get("set-cookie", "")
        assert "x-evil" not in r.headers
