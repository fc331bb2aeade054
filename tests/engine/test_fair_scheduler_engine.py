"""The step scheduler inside the real engine: a tenant's lone request finishes before a bulk
prefill of another tenant that started before it, which without the scheduler's rules would
have been computed whole in the first step. Asserted on the order of events, not on time."""

from __future__ import annotations

import asyncio

import pytest
from kvtest.caches import corpus_ids

from kvaas.engine.base import Sampling
from kvaas.engine.priorities import ENGINE_PRIORITY, INTERACTIVE, SHARED

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


async def _first_token(
    engine, ids: list[int], priority: int, max_tokens: int, order: list[str], name: str
) -> None:  # type: ignore[no-untyped-def]
    ENGINE_PRIORITY.set(priority)  # this task's own context, as the fair gate's slot sets it
    first = True
    async for _ in engine.stream(
        ids, Sampling(max_tokens=max_tokens, temperature=0.0, cache_salt=name)
    ):
        if first:
            order.append(f"{name} first token")
            first = False
    order.append(f"{name} done")


async def test_a_lone_request_overtakes_another_tenants_bulk_prefill(gateway) -> None:  # type: ignore[no-untyped-def]
    engine = gateway.app.state.engine
    ids = corpus_ids(gateway)
    order: list[str] = []
    bulk = asyncio.create_task(_first_token(engine, ids[:2000], SHARED, 1, order, "bulk"))
    await asyncio.sleep(0.05)  # the bulk request reaches the engine first
    quick = asyncio.create_task(
        _first_token(engine, ids[3000:3032], INTERACTIVE, 3, order, "quick")
    )
    await asyncio.wait_for(asyncio.gather(bulk, quick), 300)
    # 2,000 prompt tokens fit one step (2,048): without the rules the bulk request's first
    # token would come with the quick one's first step
    assert order.index("quick done") < order.index("bulk first token"), order
