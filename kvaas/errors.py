"""Error types of the HTTP API.

Every error the API returns has one shape::

    {"error": {"type": "...", "message": "...", "param": "...", "request_id": "..."}}

Each exception class below carries its HTTP status and ``type`` string; handlers in
:mod:`kvaas.api.errors` turn them (and FastAPI's own validation errors) into that body.

Internals never reach the caller: a class whose messages may name them (addresses of engine
nodes or Redis, file paths, texts of lower-level exceptions) sets ``public = False``; the caller
then gets its ``description`` and the message goes to the log, under the request id. ``detail``
carries internals of any error to the log the same way.
"""

from __future__ import annotations

from typing import Any, ClassVar


class APIError(Exception):
    """Base of all errors that become an HTTP response."""

    status_code: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    description: ClassVar[str] = "Unexpected server error."
    #: whether ``message`` may be shown to the caller (else the caller gets ``description``)
    public: ClassVar[bool] = True

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> None:
        self.message = message or self.description
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}
        #: for the log and the admin API only, never for the caller
        self.detail = detail
        super().__init__(self.message)

    @property
    def public_message(self) -> str:
        """What the caller may read: ``message``, or ``description`` when ``public`` is off."""
        return self.message if self.public else self.description


class BadRequest(APIError):
    status_code = 400
    type = "invalid_request_error"
    description = "The request is malformed."


class AuthenticationError(APIError):
    status_code = 401
    type = "authentication_error"
    description = "Invalid or missing API key."


class PermissionDenied(APIError):
    status_code = 403
    type = "permission_error"
    description = "The credentials are valid but not allowed to do this."


class NotFound(APIError):
    status_code = 404
    type = "not_found_error"
    description = "No such object."


class Conflict(APIError):
    status_code = 409
    type = "conflict_error"
    description = "The request conflicts with the current state."


class PayloadTooLarge(APIError):
    status_code = 413
    type = "payload_too_large"
    description = "The request body is larger than the server accepts."


class ValidationFailed(APIError):
    status_code = 422
    type = "validation_error"
    description = "A field of the request is invalid."


class RateLimited(APIError):
    status_code = 429
    type = "rate_limit_error"
    description = "Too many requests."


class InternalError(APIError):
    status_code = 500
    type = "internal_error"
    description = "Unexpected server error."


class ServiceUnavailable(APIError):
    status_code = 503
    type = "service_unavailable"
    description = "A component the request needs is unavailable; retry later."


class EngineUnavailable(ServiceUnavailable):
    """The engine cannot serve the request: none runs here, it died (and is restarting),
    every remote node is down or refused, or the request ran past its time limit."""

    type = "engine_unavailable"
    description = "The engine is unavailable; retry later."

    @classmethod
    def failed(cls, error: Exception) -> EngineUnavailable:
        """The answer to an engine failure ``error`` (an ``EngineError``: its text names no
        node or address, its ``detail`` does and goes to the log only), retryable."""
        return cls(
            f"the engine failed: {error}",
            detail=getattr(error, "detail", None),
            headers={"Retry-After": "5"},
        )


ALL_ERRORS: tuple[type[APIError], ...] = (
    BadRequest,
    AuthenticationError,
    PermissionDenied,
    NotFound,
    Conflict,
    PayloadTooLarge,
    ValidationFailed,
    RateLimited,
    InternalError,
    ServiceUnavailable,
    EngineUnavailable,
)
