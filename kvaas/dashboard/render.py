"""Rendering dashboard pages: the Jinja2 environment (autoescaped), formatting filters, and
the security headers every page carries (no inline script, no framing, no caching)."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from kvaas import __version__
from kvaas.dashboard.auth import CSRF_FIELD, DashboardSession

HERE = Path(__file__).parent
#: What a missing value shows as (an en dash).
DASH = "\u2013"

#: Pages load scripts, styles and images from the gateway only (the vendored files).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return DASH
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"


def fmt_int(n: float | None) -> str:
    return DASH if n is None else f"{int(n):,}"


def fmt_pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f} %"


def fmt_time(at: datetime | None) -> str:
    if at is None:
        return DASH
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_ago(at: datetime | None, now: datetime | None = None) -> str:
    if at is None:
        return "never"
    s = int(((now or datetime.now(UTC)) - at).total_seconds())
    future = s < 0
    s = abs(s)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if s >= size:
            text = f"{s // size} {unit}"
            break
    else:
        text = f"{s} s"
    return f"in {text}" if future else f"{text} ago"


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(bytes=fmt_bytes, int=fmt_int, pct=fmt_pct, time=fmt_time, ago=fmt_ago)
    env.globals.update(version=__version__, csrf_field=CSRF_FIELD)
    return env


def page(
    request: Request,
    template: str,
    session: DashboardSession | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """``template`` rendered with ``context`` plus the request, the session's CSRF token and
    the current section, with the security headers."""
    html = (
        environment()
        .get_template(template)
        .render(
            request=request,
            csrf=session.csrf if session else "",
            logged_in=session is not None,
            section=context.pop("section", ""),
            now=datetime.now(UTC),
            **context,
        )
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
