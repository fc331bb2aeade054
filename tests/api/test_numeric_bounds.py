"""No numeric input is a 5xx: every integer a request carries has an upper bound in the schema
(the OpenAPI document shows it), and huge values are a 4xx on SQLite and PostgreSQL alike."""

from __future__ import annotations

from typing import Any

import pytest
from kvtest.gateway import admin_headers

from kvaas.app import create_app
from kvaas.config import Settings

INT64_MAX = 2**63 - 1
HUGE = 10**30
CACHE = "cache_0123456789abcdef01234567"


def _integers(
    schema: dict[str, Any], spec: dict[str, Any], where: str, seen: set[str]
) -> list[tuple[str, dict[str, Any]]]:
    """``(where, schema)`` of every integer inside ``schema`` (following ``$ref``s)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return []
        return _integers(spec["components"]["schemas"][name], spec, name, seen | {name})
    found = [(where, schema)] if schema.get("type") == "integer" else []
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            found += _integers(sub, spec, where, seen)
    if "items" in schema:
        found += _integers(schema["items"], spec, f"{where}[]", seen)
    for prop, sub in schema.get("properties", {}).items():
        found += _integers(sub, spec, f"{where}.{prop}", seen)
    if isinstance(schema.get("additionalProperties"), dict):
        found += _integers(schema["additionalProperties"], spec, f"{where}.*", seen)
    return found


def _request_integers() -> list[tuple[str, dict[str, Any]]]:
    spec = create_app(Settings(_env_file=None, engine="none")).openapi()  # type: ignore[call-arg]
    found = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            for p in op.get("parameters", []):
                found += _integers(p["schema"], spec, f"{where} {p['name']}", set())
            for media in op.get("requestBody", {}).get("content", {}).values():
                found += _integers(media["schema"], spec, where, set())
    return found


def test_every_integer_of_a_request_is_bounded() -> None:
    found = _request_integers()
    assert len(found) > 10  # the walk reaches the schemas
    # (the document writes bounds past 2**53 as floats: 2**63 - 1 reads 9.223372036854776e18)
    unbounded = [
        where for where, s in found if not float(s.get("maximum", "inf")) <= float(INT64_MAX)
    ]
    assert unbounded == []


HUGE_REQUESTS: list[tuple[str, str, Any]] = [
    ("PUT", "/v1/budget", {"amount_minor": HUGE, "currency": "USD"}),
    ("POST", "/v1/cache/create", {"token_ids": [1, HUGE]}),
    ("POST", "/v1/cache/create", {"prompt": "x", "ttl_seconds": HUGE}),
    ("POST", "/v1/cache/create", {"prompt": "x", "ttl_seconds": 2**40}),
    ("POST", "/v1/cache/attach", {"cache_id": CACHE, "version": HUGE, "prompt": "x"}),
    ("POST", "/v1/cache/attach", {"cache_id": CACHE, "version": 2**40, "prompt": "x"}),
    ("POST", "/v1/cache/attach", {"cache_id": CACHE, "token_ids": [HUGE]}),
    ("POST", "/v1/cache/attach", {"cache_id": CACHE, "max_tokens": HUGE, "prompt": "x"}),
    ("POST", "/v1/cache/estimate", {"prompt": "x", "ttl_seconds": HUGE}),
    ("POST", "/v1/cache/estimate", {"prompt": "x", "expected_attaches": HUGE}),
    ("POST", "/v1/cache/estimate", {"token_ids": [HUGE]}),
    ("PATCH", f"/v1/caches/{CACHE}", {"ttl_seconds": HUGE}),
    ("POST", f"/v1/caches/{CACHE}/extend", {"token_ids": [HUGE]}),
    ("POST", f"/v1/caches/{CACHE}/extend", {"prompt": "x", "ttl_seconds": HUGE}),
    ("DELETE", f"/v1/caches/{CACHE}/versions/{HUGE}", None),
    ("POST", "/v1/completions", {"prompt": [HUGE]}),
    ("POST", "/v1/completions", {"prompt": "x", "cache_id": CACHE, "cache_version": HUGE}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": HUGE}),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "cache_id": CACHE, "cache_version": HUGE},
    ),
    ("GET", f"/v1/caches?limit={HUGE}", None),
    ("GET", f"/v1/tags?limit={HUGE}", None),
    ("GET", f"/v1/usage/events?limit={HUGE}", None),
]
ADMIN_HUGE: list[tuple[str, str, Any]] = [
    ("POST", "/admin/api/tenants", {"name": "big1", "storage_quota_tokens": HUGE}),
    ("POST", "/admin/api/tenants", {"name": "big2", "storage_quota_bytes": HUGE}),
    ("POST", "/admin/api/tenants", {"name": "big3", "max_caches": HUGE}),
    ("POST", "/admin/api/tenants", {"name": "big4", "max_caches": 2**40}),
    ("GET", f"/admin/api/audit?limit={HUGE}", None),
]


async def test_huge_numbers_are_client_errors(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(tenants=("acme",)) as api:
        for method, path, body in HUGE_REQUESTS:
            r = await api.client.request(method, path, json=body, headers=api.auth())
            assert 400 <= r.status_code < 500, (method, path, body, r.text)
        for method, path, body in ADMIN_HUGE:
            r = await api.client.request(method, path, json=body, headers=admin_headers())
            assert 400 <= r.status_code < 500, (method, path, body, r.text)
        r = await api.client.get("/admin/api/tenants", headers=admin_headers())
        assert [t["name"] for t in r.json()["data"]] == ["acme"]


@pytest.mark.parametrize(
    ("method", "path", "template"),
    [
        ("PUT", "/v1/budget", b'{"amount_minor": %s, "currency": "USD"}'),
        ("POST", "/v1/cache/create", b'{"prompt": "x", "ttl_seconds": %s}'),
        ("POST", "/v1/cache/create", b'{"token_ids": [%s]}'),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": %s}'),
    ],
)
async def test_integers_of_thousands_of_digits_are_client_errors(  # type: ignore[no-untyped-def]
    make_app, method: str, path: str, template: bytes
) -> None:
    async with make_app(tenants=("acme",)) as api:
        for digits in (4301, 20_000):
            body = template % (b"9" * digits)
            headers = api.auth(**{"Content-Type": "application/json"})
            r = await api.client.request(method, path, content=body, headers=headers)
            assert r.status_code in (400, 422), r.text
            assert r.json()["error"]["type"] in ("invalid_request_error", "validation_error")


async def test_query_and_path_integers_of_thousands_of_digits_are_client_errors(make_app) -> None:  # type: ignore[no-untyped-def]
    many = "9" * 20_000
    async with make_app(tenants=("acme",)) as api:
        for path in (
            f"/v1/caches?limit={many}",
            f"/v1/tags?limit={many}",
            f"/v1/usage/events?limit={many}",
        ):
            r = await api.client.get(path, headers=api.auth())
            assert r.status_code == 422, r.text
        r = await api.client.delete(f"/v1/caches/{CACHE}/versions/{many}", headers=api.auth())
        assert r.status_code == 422, r.text
        r = await api.client.get(f"/admin/api/audit?limit={many}", headers=admin_headers())
        assert r.status_code == 422, r.text
