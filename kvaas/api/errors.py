"""Turning exceptions into the one error body, and declaring errors in the OpenAPI spec."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvaas.db.session import DatabaseUnavailable, is_connection_error
from kvaas.errors import (
    APIError,
    BadRequest,
    InternalError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ValidationFailed,
)

log = logging.getLogger("kvaas.api")


class ErrorDetail(BaseModel):
    type: str = Field(description="Stable machine-readable error type.")
    message: str = Field(description="Human-readable explanation.")
    param: str | None = Field(None, description="The request field at fault, when one is.")
    request_id: str = Field(description="Identifier of the request (also in `X-Request-ID`).")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_payload(
    type_: str, message: str, request_id: str, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    detail: dict[str, Any] = {"type": type_, "message": message, "request_id": request_id}
    if param is not None:
        detail["param"] = param
    detail.update(extra)
    return {"error": detail}


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "") or ""


def api_error_response(request: Request, err: APIError) -> JSONResponse:
    rid = request_id_of(request)
    return JSONResponse(
        error_payload(err.type, err.message, rid, err.param, **err.extra),
        status_code=err.status_code,
        headers={**err.headers, "X-Request-ID": rid},
    )


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return api_error_response(request, err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0] if errors else {}
        param = _loc_to_param(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            e: APIError = ValidationFailed("the request body is not valid JSON", param=None)
        else:
            msg = first.get("msg", "invalid request")
            e = ValidationFailed(f"{param}: {msg}" if param else msg, param=param)
        return api_error_response(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            e: APIError = NotFound(f"no route {request.method} {request.url.path}")
        elif err.status_code == 413:
            e = PayloadTooLarge(str(err.detail))
        elif err.status_code == 405:
            e = BadRequest(f"method {request.method} is not allowed on {request.url.path}")
            e.status_code = 405  # type: ignore[misc]
        else:
            e = BadRequest(str(err.detail))
            e.status_code = err.status_code  # type: ignore[misc]
        return api_error_response(request, e)

    @app.exception_handler(DatabaseUnavailable)
    async def _db_down(request: Request, err: DatabaseUnavailable) -> JSONResponse:
        log.warning("database unavailable: %s", err)
        return api_error_response(
            request,
            ServiceUnavailable(
                "the metadata database is unavailable; retry later", headers={"Retry-After": "5"}
            ),
        )

    @app.exception_handler(DataError)
    async def _bad_value(request: Request, err: DataError) -> JSONResponse:
        # a value the database refuses to store or compare (e.g. a NUL character in a text
        # field on PostgreSQL): the request's fault, not the server's
        log.info("database refused a request value: %s", err.orig)
        return api_error_response(
            request,
            ValidationFailed(f"a value in the request is not valid: {str(err.orig)[:200]}"),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        if is_connection_error(err):
            return await _db_down(request, DatabaseUnavailable(str(err)))
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return api_error_response(request, InternalError())


def error_responses(*errors: type[APIError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error classes (always with 5xx)."""
    out: dict[int | str, dict[str, Any]] = {}
    classes: tuple[type[APIError], ...] = (
        *errors,
        ValidationFailed,
        InternalError,
        ServiceUnavailable,
    )
    for cls in classes:
        status = cls.status_code
        if status in out:
            out[status]["description"] += f" / {cls.description}"
            continue
        out[status] = {"model": ErrorBody, "description": cls.description}
    return out
