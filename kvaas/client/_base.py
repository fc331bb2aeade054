"""What the sync and async clients share besides the endpoints: settings, the HTTP client
they send with, the request a :class:`~kvaas.client._spec.Call` becomes, and the retry policy.

Retry policy: a request is tried at most ``max_retries + 1`` times. It is tried again after a
connection failure, a 502, 503 or 504, and a 429 or 409 that carries ``Retry-After``; it waits
``Retry-After`` seconds when the answer says so (capped at ``max_retry_after_s``), else
``backoff_s * 2**attempt`` (capped at ``max_backoff_s``) times a jitter factor in [0.5, 1).
"""

from __future__ import annotations

import random
import uuid
from typing import Any, Generic, TypeVar

import httpx

from ._spec import Call
from .errors import APIConnectionError

DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
RETRY_STATUSES = frozenset({429, 502, 503, 504})

H = TypeVar("H", httpx.Client, httpx.AsyncClient)


def retryable(r: httpx.Response) -> bool:
    """502-504, and a 429 or 409 that says when to come back (``Retry-After``: a rate limit,
    an idempotency key whose first request is still running). A 429 without it (a limit on
    how many caches a tenant holds) is final."""
    return r.status_code in RETRY_STATUSES or (r.status_code == 409 and "retry-after" in r.headers)


def answer_json(r: httpx.Response) -> Any:
    """The JSON of a successful answer; ``None`` when it has no body (``204``)."""
    return None if r.status_code == 204 or not r.content else r.json()


class ClientBase(Generic[H]):
    """Settings, HTTP client and request building of both clients; subclasses name their
    HTTP client class (``_http_class``) and own the sending loop.

    ``http_client``: an HTTP client to send with, left open when the client closes (without
    one the client makes its own with ``timeout``, and closes it); ``max_retries``,
    ``backoff_s``, ``max_backoff_s``, ``max_retry_after_s``: the retry policy."""

    _http_class: type[H]

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        http_client: H | None = None,
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
        self._owns_http = http_client is None
        self._http: H = http_client or self._http_class(timeout=timeout)

    def _headers(self, call: Call[Any]) -> dict[str, str]:
        """The headers of every attempt of ``call``; a ``POST`` gets its idempotency key here,
        once per logical call."""
        headers = {"Authorization": f"Bearer {self.api_key}", "User-Agent": "kvaas-python"}
        if call.method == "POST":
            headers["Idempotency-Key"] = call.idempotency_key or f"kvc-{uuid.uuid4().hex}"
        return headers

    def _request(self, call: Call[Any], headers: dict[str, str]) -> httpx.Request:
        """One attempt of ``call``; query parameters that are ``None`` are left out."""
        params = {k: v for k, v in (call.params or {}).items() if v is not None}
        return self._http.build_request(
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

    def _wait_after_failure(self, attempt: int, error: httpx.TransportError) -> float:
        """After try ``attempt`` (0-based) got no answer (``error``), the seconds to wait before
        trying again; raises :class:`APIConnectionError` when no retry is left."""
        wait = self._retry_wait(attempt, None)
        if wait is None:
            raise APIConnectionError(f"{type(error).__name__}: {error}") from error
        return wait
