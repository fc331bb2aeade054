"""Masking secrets in text that is printed or logged."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*):[^@/]*@")


def redact_url(url: str) -> str:
    """``url`` with the password of its user info masked (``redis://:pw@h`` → ``redis://:***@h``,
    ``postgresql://u:pw@h/db`` → ``postgresql://u:***@h/db``); other URLs unchanged."""
    return _URL_PASSWORD.sub(r"\1:***@", url)
