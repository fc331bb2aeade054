"""Turning exceptions into the one error body, and declaring errors in the OpenAPI spec.

A caller reads only what an error allows (:attr:`kvaas.errors.APIError.public_message`);
what it carries for the operator (messages that are not public, ``detail``, the errors it was
raised from) is logged with the request id, which the caller's answer also holds.
"""

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
from kvaas.engine import EngineError
from kvaas.errors import (
    APIError,
    BadRequest,
    EngineUnavailable,
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


def internals_of(err: BaseException) -> str | None:
    """What ``err`` holds for the operator only: its message when that is not public, its
    ``detail``, and those of the errors it was raised from (``None`` when there is nothing)."""
    parts: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, APIError):
            parts += [p for p in (None if e.public else e.message, e.detail) if p]
        else:
            parts.append(getattr(e, "detail", None) or f"{type(e).__name__}: {e}")
        e = e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__
    return "; ".join(parts) or None


def _engine_failure(err: BaseException) -> EngineError | None:
    """The engine failure ``err`` is, or was raised from (``None`` when there is none)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        if isinstance(e, EngineError):
            return e
        seen.add(id(e))
        e = e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__
    return None


def as_api_error(err: BaseException) -> APIError | None:
    """The API error ``err`` answers as: itself when it is one, except that every failure
    of the engine (an :class:`EngineError`, or a 503 raised from one, such as a prefill that
    failed) is ``503 engine_unavailable``; ``None`` for anything else."""
    engine = _engine_failure(err)
    if engine is not None and (not isinstance(err, APIError) or err.status_code == 503):
        if isinstance(err, EngineUnavailable):
            return err
        if isinstance(err, APIError):
            out = EngineUnavailable(err.public_message, headers={"Retry-After": "5", **err.headers})
        else:
            out = EngineUnavailable.failed(engine)
        out.__cause__ = err
        return out
    return err if isinstance(err, APIError) else None


def stream_error_event(err: Exception, request_id: str = "") -> dict[str, Any]:
    """The in-band error of a stream whose status line is already sent: the error's public
    message (a generic one for anything that is not an :class:`APIError`; an engine failure
    is ``engine_unavailable``); its internals go to the log, never to the client."""
    public = as_api_error(err)
    rid = request_id or "-"
    log.warning("request %s: stream failed: %s", rid, internals_of(err), exc_info=public is None)
    if public is None:
        return error_payload("internal_error", "generation failed", request_id)
    return error_payload(public.type, f"generation failed: {public.public_message}", request_id)


def api_error_response(request: Request, err: APIError) -> JSONResponse:
    rid = request_id_of(request)
    internals = internals_of(err)
    if internals is not None:  # the caller's fault (4xx) is routine; the platform's is not
        log.log(
            logging.WARNING if err.status_code >= 500 else logging.INFO,
            "request %s: %s %s answered %d %s: %s",
            rid,
            request.method,
            request.url.path,
            err.status_code,
            err.type,
            internals,
        )
    return JSONResponse(
        error_payload(err.type, err.public_message, rid, err.param, **err.extra),
        status_code=err.status_code,
        headers={**err.headers, "X-Request-ID": rid},
    )


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return api_error_response(request, as_api_error(err) or err)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, err: EngineError) -> JSONResponse:
        return api_error_response(request, as_api_error(err) or InternalError())

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
        return api_error_response(
            request,
            ServiceUnavailable(
                "the metadata database is unavailable; retry later",
                headers={"Retry-After": "5"},
                detail=f"database unavailable: {err}",
            ),
        )

    @app.exception_handler(DataError)
    async def _bad_value(request: Request, err: DataError) -> JSONResponse:
        # a value the database refuses to store or compare that request validation let
        # through: the request's fault, not the server's; the database's words stay in the log
        return api_error_response(
            request,
            ValidationFailed(
                "a value in the request cannot be stored: remove control characters and "
                "keep text within the documented lengths",
                detail=f"the database refused a request value: {err.orig}",
            ),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        if is_connection_error(err):
            db = getattr(request.app.state, "db", None)
            down = db.outage(err) if db is not None else DatabaseUnavailable(str(err))
            return await _db_down(request, down)
        log.exception(
            "request %s: unhandled error in %s %s",
            request_id_of(request),
            request.method,
            request.url.path,
        )
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
