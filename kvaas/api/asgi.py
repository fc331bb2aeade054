"""Helpers for plain ASGI middleware: answering with the API's error body before (or instead
of) the application."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import Message, Scope

from kvaas.api.errors import error_payload
from kvaas.errors import APIError


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower case), or ``None``."""
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def request_id(scope: Scope) -> str:
    """The request id the request-context middleware gave this request."""
    return str(scope.get("state", {}).get("request_id", ""))


def error_response_messages(
    scope: Scope, err: APIError, *, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> list[Message]:
    """The two ASGI messages of the error response for ``err`` (status, headers, body)."""
    rid = request_id(scope)
    body = json.dumps(error_payload(err.type, err.message, rid, err.param, **err.extra)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()),
        *extra_headers,
    ]
    if rid:
        headers.append((b"x-request-id", rid.encode()))
    return [
        {"type": "http.response.start", "status": err.status_code, "headers": headers},
        {"type": "http.response.body", "body": body},
    ]
