"""The exceptions the client raises, and how an error answer maps to one.

An error answer ``{"error": {type, message, param, request_id, ...}}`` raises the
:class:`KVaaSError` subclass of its ``type`` (else of its HTTP status, else :class:`KVaaSError`
itself); a request that got no answer raises :class:`APIConnectionError`. A subclass that
declares a ``type`` is the class of that error type; one that declares a ``status_code`` is the
class of that status.
"""

from __future__ import annotations

from typing import Any

import httpx

_BY_TYPE: dict[str, type[KVaaSError]] = {}
_BY_STATUS: dict[int, type[KVaaSError]] = {}


class KVaaSError(Exception):
    """An error answer of the API (or, for :class:`APIConnectionError`, no answer at all)."""

    status_code: int | None = None
    type: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register ``cls`` for the error type and the status it declares itself."""
        super().__init_subclass__(**kwargs)
        if "type" in vars(cls) and cls.type is not None:
            _BY_TYPE[cls.type] = cls
        if "status_code" in vars(cls) and cls.status_code is not None:
            _BY_STATUS[cls.status_code] = cls

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        body: dict[str, Any] | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if type is not None:
            self.type = type
        self.param = param
        self.request_id = request_id
        self.body = body or {}
        self.response = response

    def __str__(self) -> str:
        where = f" [{self.request_id}]" if self.request_id else ""
        return f"{self.status_code} {self.type}: {self.message}{where}"


class APIConnectionError(KVaaSError):
    """The server could not be reached, or the connection broke."""


class BadRequestError(KVaaSError):
    status_code, type = 400, "invalid_request_error"


class AuthenticationError(KVaaSError):
    status_code, type = 401, "authentication_error"


class PermissionDeniedError(KVaaSError):
    status_code, type = 403, "permission_error"


class NotFoundError(KVaaSError):
    status_code, type = 404, "not_found_error"


class ConflictError(KVaaSError):
    status_code, type = 409, "conflict_error"


class CacheMissError(ConflictError):
    type = "cache_miss"


class IdempotencyConflictError(ConflictError):
    type = "idempotency_conflict"


class QuotaExceededError(KVaaSError):
    status_code, type = 402, "quota_exceeded"


class PayloadTooLargeError(KVaaSError):
    status_code, type = 413, "payload_too_large"


class ValidationError(KVaaSError):
    status_code, type = 422, "validation_error"


class RateLimitError(KVaaSError):
    status_code, type = 429, "rate_limit_error"


class CacheLimitExceededError(RateLimitError):
    type = "cache_limit_exceeded"


class InternalServerError(KVaaSError):
    status_code, type = 500, "internal_error"


class ServiceUnavailableError(KVaaSError):
    status_code, type = 503, "service_unavailable"


class EngineUnavailableError(ServiceUnavailableError):
    type = "engine_unavailable"


def error_from_body(
    status: int | None, body: Any, response: httpx.Response | None = None
) -> KVaaSError:
    """The exception for an error body ``{"error": {type, message, ...}}``."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {"message": str(body)[:500] if body else f"HTTP {status}"}
    etype = detail.get("type")
    cls = _BY_TYPE.get(etype or "") or _BY_STATUS.get(status or 0) or KVaaSError
    request_id = detail.get("request_id") or (
        response.headers.get("x-request-id") if response is not None else None
    )
    return cls(
        str(detail.get("message", "")),
        status_code=status,
        type=etype,
        param=detail.get("param"),
        request_id=request_id,
        body=detail,
        response=response,
    )


def error_from_response(r: httpx.Response) -> KVaaSError:
    """The exception for an error answer (its body JSON, else its text)."""
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    return error_from_body(r.status_code, body, r)
