"""Every engine request is metered once: completions without a cache, and streams whose client
goes away before the end (they pay for what the engine produced until then)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from kvtest.caches import Client, corpus_ids, new_client
from sqlalchemy import func, select

from kvaas.db.models import UsageEvent

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

#: more tokens than the engine produces before the client below has gone
LONG = 3000


async def _usage(cl: Client) -> dict[str, tuple[int, int]]:
    """The tenant's usage events: meter -> (total quantity, number of events)."""
    async with cl.gateway.app.state.db.session() as s:
        rows = (
            await s.execute(
                select(UsageEvent.meter, func.sum(UsageEvent.quantity), func.count())
                .where(UsageEvent.tenant_id == cl.tenant_id)
                .group_by(UsageEvent.meter)
            )
        ).all()
    return {meter: (int(total), int(n)) for meter, total, n in rows}


async def _settled(cl: Client, meter: str = "output_tokens") -> dict[str, tuple[int, int]]:
    """The tenant's usage once ``meter`` is recorded and its engine slots are free (a stream's
    recording lands as its request ends, after the client has gone)."""
    gate = cl.service.gate
    for _ in range(600):
        usage = await _usage(cl)
        if meter in usage and gate.running_for(cl.tenant_id) == 0:
            return usage
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {meter} recorded: {await _usage(cl)}")


async def _first_chunk_then_leave(url: str, path: str, key: str, body: dict[str, Any]) -> dict:
    """Stream ``body`` to ``path``, read the first chunk that carries tokens, and disconnect."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=300) as http,
        http.stream("POST", path, json=body, headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            choice = chunk["choices"][0]
            if choice.get("text") or choice.get("token_ids"):
                return chunk
    raise AssertionError("the stream ended before any token")


async def test_completions_without_a_cache_are_metered(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    r = await cl.request(
        "POST",
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": corpus_ids(gateway)[:40],
            "max_tokens": 5,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    chat = await cl.request(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "max_tokens": 3,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What does this module do?"}],
        },
    )
    assert chat.status_code == 200, chat.text
    answered = [r.json()["usage"], chat.json()["usage"]]
    usage = await _usage(cl)
    computed = [u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in answered]
    prefill = sum(computed)
    assert usage["prefill_tokens"] == (prefill, 2)
    assert usage["output_tokens"] == (sum(u["completion_tokens"] for u in answered), 2)
    assert "cached_tokens" not in usage and "cache_creations" not in usage


async def test_streamed_attach_left_early_is_metered_once(gateway, served_gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    ids = corpus_ids(gateway)
    cache = await cl.create(ids[:512])
    before = await _usage(cl)
    body = {
        "cache_id": cache["id"],
        "token_ids": ids[512:530],
        "stream": True,
        "max_tokens": LONG,
        "temperature": 0,
    }
    await _first_chunk_then_leave(served_gateway, "/v1/cache/attach", cl.key, body)
    usage = await _settled(cl)
    prompt = usage["prefill_tokens"][0] - before["prefill_tokens"][0]
    prompt += usage.get("cached_tokens", (0, 0))[0]
    assert prompt == 530  # the whole prompt: loaded from the cache or computed
    output, events = usage["output_tokens"]
    assert 0 < output < LONG and events == 1  # what was produced, recorded once


async def test_streamed_completion_left_early_is_metered_once(gateway, served_gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    body = {
        "model": "tiny",
        "prompt": corpus_ids(gateway)[:64],
        "stream": True,
        "max_tokens": LONG,
        "temperature": 0,
    }
    await _first_chunk_then_leave(served_gateway, "/v1/completions", cl.key, body)
    usage = await _settled(cl)
    assert usage["prefill_tokens"] == (64, 1)
    output, events = usage["output_tokens"]
    assert 0 < output < LONG and events == 1
