"""A stream that fails after its status line reports the failure in-band with a generic
message: the engine's exception text (node addresses, paths) goes to the log, not the client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kvtest.caches import corpus_ids, new_client

pytestmark = [pytest.mark.engine, pytest.mark.postgres, pytest.mark.redis]

SECRET = "node 10.9.8.7:6379 failed reading /var/lib/kvaas/chunks/ab/cdef"


async def _events(cl: Any, path: str, body: dict[str, Any]) -> list[str]:
    out = []
    async with cl.http.stream("POST", path, json=body, headers=cl.headers()) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
    return out


async def test_stream_failure_is_reported_without_internals(gateway, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    c = await cl.create(corpus_ids(gateway)[:300])
    engine = gateway.app.state.engine
    real = engine.stream

    async def failing(*args: Any, **kw: Any) -> AsyncIterator[Any]:
        async for d in real(*args, **kw):
            yield d
            raise RuntimeError(SECRET)

    monkeypatch.setattr(engine, "stream", failing)
    cases = [
        ("/v1/cache/attach", {"cache_id": c["id"], "max_tokens": 4, "stream": True}),
        ("/v1/completions", {"prompt": "hello there", "max_tokens": 4, "stream": True}),
    ]
    for path, body in cases:
        events = await _events(cl, path, body)
        assert events[-1] == "[DONE]", events
        errors = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
        assert len(errors) == 1, events
        assert errors[0]["type"] == "internal_error" and errors[0]["message"] == "generation failed"
        assert "10.9.8.7" not in "".join(events) and "/var/lib" not in "".join(events)
    assert SECRET in caplog.text  # the operator still sees it
