"""What the sync and async clients share besides the endpoints: settings, the request a
:class:`~kvaas.client._spec.Call` becomes, and the retry policy.

Retry policy: a request is tried at most ``max_retries + 1`` times. It is tried again after a
connection failure, a 502, 503 or 504, and a 429 or 409 that carries ``Retry-After``; it waits
``Retry-After`` seconds when the answer says so (capped at ``max_retry_after_s``), else
``backoff_s * 2**attempt`` (capped at ``max_backoff_s``) times a jitter factor in [0.5, 1).
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import httpx

from ._spec import Call

DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
RETRY_STATUSES = frozenset({429, 502, 503, 504})


def retryable(r: httpx.Response) -> bool:
    """502-504, and a 429 or 409 that says when to come back (``Retry-After``: a rate limit,
    an idempotency key whose first request is still running). A 429 without it (a limit on
    how many caches a tenant holds) is final."""
    return r.status_code in RETRY_STATUSES or (r.status_code == 409 and "retry-after" in r.headers)


def answer_json(r: httpx.Response) -> Any:
    """The JSON of a successful answer; ``None`` when it has no body (``204``)."""
    return None if r.status_code == 204 or not r.content else r.json()


class ClientBase:
    """Settings and request building of both clients; subclasses own the HTTP client and
    the sending loop."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_retry_after_s: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s

    def _headers(self, call: Call[Any]) -> dict[str, str]:
        """The headers of every attempt of ``call``; a ``POST`` gets its idempotency key here,
        once per logical call."""
        headers = {"Authorization": f"Bearer {self.api_key}", "User-Agent": "kvaas-python"}
        if call.method == "POST":
            headers["Idempotency-Key"] = call.idempotency_key or f"kvc-{uuid.uuid4().hex}"
        return headers

    def _request(
        self, http: httpx.Client | httpx.AsyncClient, call: Call[Any], headers: dict[str, str]
    ) -> httpx.Request:
        """One attempt of ``call``; query parameters that are ``None`` are left out."""
        params = {k: v for k, v in (call.params or {}).items() if v is not None}
        return http.build_request(
            call.method,
            self.base_url + call.path,
            json=call.json,
            params=params or None,
            headers=headers,
        )

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait before retry ``attempt`` (0-based): ``Retry-After`` when the server
        sent one, else exponential backoff with jitter."""
        if response is not None:
            ra = response.headers.get("retry-after")
            if ra is not None:
                try:
                    return min(max(float(ra), 0.0), self.max_retry_after_s)
                except ValueError:
                    pass
        base = min(self.max_backoff_s, self.backoff_s * 2.0**attempt)
        return base * (0.5 + random.random() / 2)

    def _retry_wait(self, attempt: int, response: httpx.Response | None) -> float | None:
        """After try ``attempt`` (0-based) answered ``response`` (``None``: the connection
        failed), the seconds to wait before trying again, or ``None`` to stop: the answer is
        final, or no retry is left."""
        if attempt >= self.max_retries or (response is not None and not retryable(response)):
            return None
        return self._delay(attempt, response)
