"""The scope table of the API, read from the routes themselves.

Each route that takes an API key declares its scope with
:func:`kvaas.api.deps.require_scope`; that declaration is the only place a scope is written.
From it come the start-up check that no API-key route is left without one
(:func:`check_scoped`), the table in docs/api.md (:func:`scope_table_markdown`) and the
``x-required-scope`` of each operation in the OpenAPI document (:func:`document_scopes`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from kvaas.api.deps import route_auth
from kvaas.errors import PermissionDenied

#: How the table and the OpenAPI document show a route that any valid key may call.
ANY_KEY = "any valid key"


def api_key_routes(app: FastAPI) -> list[tuple[str, str, str | None]]:
    """``(method, path, scope)`` of every route that takes an API key and declares its scope
    (``None``: any valid key), in the app's route order."""
    rows: list[tuple[str, str, str | None]] = []
    for route in app.routes:
        takes_key, requirements = route_auth(route)
        if takes_key and requirements and isinstance(route, APIRoute):
            scope = requirements[0].scope
            rows.extend((method, route.path, scope) for method in sorted(route.methods))
    return rows


def check_scoped(app: FastAPI) -> None:
    """Raise ``RuntimeError`` naming every route that takes an API key but declares no scope
    (deny by default: such an app does not start)."""
    missing = [
        f"{','.join(sorted(route.methods))} {route.path}"
        for route in app.routes
        if isinstance(route, APIRoute) and route_auth(route) == (True, [])
    ]
    if missing:
        raise RuntimeError(
            "routes that take an API key must declare a scope with "
            f"`dependencies=[require_scope(...)]`: {', '.join(missing)}"
        )


def scope_table_markdown(app: FastAPI) -> str:
    """The table of docs/api.md: each API-key route and the scope its key needs."""
    rows = ["| Method | Path | Scope |", "|---|---|---|"]
    for method, path, scope in sorted(api_key_routes(app), key=lambda r: (r[1], r[0])):
        rows.append(f"| {method} | `{path}` | {f'`{scope}`' if scope else ANY_KEY} |")
    return "\n".join(rows)


def document_scopes(app: FastAPI) -> None:
    """Add each API-key operation's scope to the OpenAPI document (``x-required-scope`` and a
    line of its description) with the ``403`` a key without it gets."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        scopes = {(m.lower(), path): scope for m, path, scope in api_key_routes(app)}
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                if (method, path) not in scopes:
                    continue
                scope = scopes[(method, path)]
                op["x-required-scope"] = scope  # null: any valid key
                need = (
                    f"Needs an API key with the `{scope}` scope (or `*`)."
                    if scope
                    else "Any valid API key may call it."
                )
                text = op.get("description")
                op["description"] = f"{text}\n\n{need}" if text else need
                op.setdefault("responses", {}).setdefault(
                    "403",
                    {
                        "description": PermissionDenied.description,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorBody"}
                            }
                        },
                    },
                )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
