"""ASGI middleware: request ids, body size limits and request metrics.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so streaming responses pass through
untouched and the body limit is enforced while reading, not after buffering.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvaas.metrics import HTTP_LATENCY, HTTP_REQUESTS

_INCOMING_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")

#: The routes whose body carries a prompt (create, extend, attach, estimate, completions): their
#: bodies are held to the prompt limit, which the engine's context sets.
PROMPT_ROUTES = re.compile(
    r"^/v1/(?:cache/(?:create|attach|estimate)|caches/[^/]+/extend|chat/completions|completions)$"
)


class _BodyTooLarge(Exception):
    pass


class RequestContextMiddleware:
    """Gives every request an id (``X-Request-ID``, echoed when the client sent a sane one),
    refuses bodies above ``max_body_bytes`` (above ``prompt_body_bytes`` on the
    :data:`PROMPT_ROUTES`, when smaller) with a 413, and records Prometheus metrics. A body whose
    declared length is over the limit is refused before any of it is read."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        prompt_body_bytes: Callable[[], int] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.prompt_body_bytes = prompt_body_bytes  # read per request: the engine may change

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _INCOMING_ID_RE.match(incoming) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        rid_header = (b"x-request-id", request_id.encode())
        started = time.perf_counter()
        status_holder: dict[str, Any] = {"status": 500, "started": False, "too_large": False}
        limit = self.max_body_bytes
        if self.prompt_body_bytes is not None and PROMPT_ROUTES.match(scope["path"]):
            limit = min(limit, self.prompt_body_bytes())

        async def send_too_large() -> None:
            """Answer 413, unless an answer has started."""
            if not status_holder["started"]:
                status_holder["started"] = True
                await _send_too_large(send_wrapper_raw, limit, request_id)

        async def send_wrapper(message: Message) -> None:
            if status_holder["too_large"]:
                # The app caught our error while reading the body and answered something else
                # (FastAPI turns body-read failures into 400): answer 413 instead, once.
                if message["type"] == "http.response.start":
                    await send_too_large()
                return
            await send_wrapper_raw(message)

        async def send_wrapper_raw(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                hdrs = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in hdrs):
                    hdrs.append(rid_header)
                message = {**message, "headers": hdrs}
            await send(message)

        declared = headers.get("content-length")
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise _BodyTooLarge
            received = 0

            async def receive_wrapper() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        status_holder["too_large"] = True
                        raise _BodyTooLarge
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        except _BodyTooLarge:
            await send_too_large()
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            status = str(status_holder["status"])
            HTTP_REQUESTS.labels(scope["method"], path, status).inc()
            HTTP_LATENCY.labels(scope["method"], path).observe(time.perf_counter() - started)


async def _send_too_large(send: Send, limit: int, request_id: str) -> None:
    """The ``413 payload_too_large`` error answer, in the API's error body."""
    message = (
        f"request body exceeds the limit of {limit} bytes for this route (KVAAS_MAX_REQUEST_BYTES;"
        " a body carrying a prompt is also held to what the model's context can hold)"
    )
    body = json.dumps(
        {"error": {"type": "payload_too_large", "message": message, "request_id": request_id}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
