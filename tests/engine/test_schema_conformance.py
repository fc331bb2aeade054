"""Schemathesis against the served gateway (real engine): the cache and OpenAI-compatible
operations never answer 5xx, and every answer matches the OpenAPI document (status code and
body schema). A few examples per operation keep the run short."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hyp_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

#: The operations under test: caches, tags and the OpenAI-compatible surface.
PATHS = r"^/v1/(cache/|caches|tags|chat/completions|completions|models|usage|invoices|budget)"
EXAMPLES_PER_OPERATION = 6
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


def _bounded(case: Any) -> None:
    """Keep generations short: the run is about the API contract, not the engine's speed."""
    if isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(field), int) and case.body[field] > 4:
                case.body[field] = 4


def _run(spec: dict[str, Any], base_url: str, headers: dict[str, str]) -> dict[str, str]:
    schema = schemathesis.openapi.from_dict(spec).include(path_regex=PATHS)
    failures: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1

        @hyp_settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy())
        def check(case: Any) -> None:
            _bounded(case)
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=120)

        try:
            check()
        except (Exception, BaseExceptionGroup) as e:  # collect every operation's findings
            failures[op.label] = f"{type(e).__name__}: {e}"[:3000]
    assert operations >= 5, "the operations under test are missing from the document"
    return failures


async def test_cache_and_openai_operations_conform(gateway, served_gateway: str) -> None:  # type: ignore[no-untyped-def]
    failures = await asyncio.to_thread(_run, gateway.app.openapi(), served_gateway, gateway.auth())
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
