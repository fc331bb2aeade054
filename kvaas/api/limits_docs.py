"""The OpenAPI description of what the API's middleware adds to every route: the
``Idempotency-Key`` header and its ``409`` on every POST under ``/v1/``
(:mod:`kvaas.api.idempotency`), and ``429`` on every ``/v1/`` operation (rate limits)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from kvaas.api.idempotency import IdempotencyConflict
from kvaas.errors import RateLimited


def document_limits(app: FastAPI, *, max_key_length: int) -> None:
    """Add what the middleware does to the OpenAPI document: the ``Idempotency-Key`` header
    and its ``409`` on every POST under ``/v1/``, and ``429`` on every ``/v1/`` operation."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        error_ref = {"$ref": "#/components/schemas/ErrorBody"}
        for path, item in schema.get("paths", {}).items():
            if not path.startswith("/v1/"):
                continue
            for method, op in item.items():
                responses = op.setdefault("responses", {})
                limited = responses.setdefault(
                    "429",
                    {
                        "description": RateLimited.description,
                        "content": {"application/json": {"schema": error_ref}},
                    },
                )
                if RateLimited.description not in limited["description"]:  # the route's own 429
                    limited["description"] += f" / {RateLimited.description}"
                limited.setdefault("headers", {})["Retry-After"] = {
                    "description": "Seconds until the request may be retried.",
                    "schema": {"type": "integer"},
                }
                if method != "post":
                    continue
                params = op.setdefault("parameters", [])
                params.append(
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "Makes retries of this request safe: the same key and "
                        "body within 24 h replay the first response.",
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": max_key_length,
                            "pattern": "^[\\x20-\\x7e]+$",
                        },
                    }
                )
                if "409" in responses:
                    responses["409"]["description"] += f" / {IdempotencyConflict.description}"
                else:
                    responses["409"] = {
                        "description": IdempotencyConflict.description,
                        "content": {"application/json": {"schema": error_ref}},
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
