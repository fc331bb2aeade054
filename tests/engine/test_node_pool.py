"""Remote node pool health: a node that refuses connections is ejected and the request goes to
another node, a node serving other weights is refused, readiness reports k of N.

The nodes here are small HTTP servers on real sockets that answer the routes the gateway uses
(``/health``, ``/kvaas/fingerprint``, ``/v1/models``, ``/v1/completions``) as ``python -m
kvaas.engine.node`` does; a node that is down is a port nobody listens on. The real node,
started by the printed command and killed, is in ``tests/faults/test_remote_node_kill.py``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from kvtest.serve import serve

from kvaas.connector.params import TransferPlan
from kvaas.engine import Degraded, EngineError, ModelInfo, Sampling
from kvaas.engine.remote import ROUTES, RemoteEngine

FINGERPRINT = "f" * 32
MODEL = ModelInfo(path=Path("/nonexistent"), name="tiny", fingerprint=FINGERPRINT, tokenizer=None)


class StandIn:
    """One node: counts the completions it served."""

    def __init__(self, fingerprint: str = FINGERPRINT, world: tuple[int, int] = (1, 1)) -> None:
        self.completions = 0
        self.up = True
        self.active = 0  # completions being answered now
        self.most_active = 0
        #: completions wait for this to be set (set: they answer at once)
        self.gate = asyncio.Event()
        self.gate.set()
        self.arrived = asyncio.Event()  # a completion came in
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {}

        @app.get("/kvaas/fingerprint")
        async def fp() -> dict[str, object]:
            return {"fingerprint": fingerprint, "world": list(world)}

        @app.get("/v1/models")
        async def models() -> dict[str, list[dict[str, object]]]:
            return {"data": [{"id": "tiny", "max_model_len": 2048}]}

        @app.post("/v1/completions")
        async def complete(request: Request) -> dict[str, object]:
            body = await request.json()
            self.completions += 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.arrived.set()
            try:
                await self.gate.wait()
            finally:
                self.active -= 1
            return {
                "choices": [{"text": "x", "token_ids": [7], "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(body["prompt"])},
            }

        self.app = app


def closed_port_url() -> str:
    """A URL where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as st:
        yield st


def pool(urls: list[str], **kw: float) -> RemoteEngine:
    args = {"max_failures": 2, "cooldown_s": 3600.0, "probe_every_s": 3600.0, **kw}
    return RemoteEngine(MODEL, urls, **args)  # type: ignore[arg-type]


ONE = Sampling(max_tokens=1, temperature=0.0)


async def test_refusing_node_is_ejected_and_requests_go_elsewhere(stack: AsyncExitStack) -> None:
    good = StandIn()
    url = await stack.enter_async_context(serve(good.app))
    dead = closed_port_url()
    eng = pool([dead, url])
    await eng.start()
    stack.push_async_callback(eng.shutdown)
    # the start-up probe already failed once on the dead node; it still has 0 in flight and
    # is still routed to (failing, not yet ejected), which readiness tells apart
    line = await eng.health()
    assert isinstance(line, Degraded) and line.endswith("(1 failing)"), line
    for _ in range(10):
        g = await eng.generate([1, 2, 3], ONE)
        assert g.token_ids == [7]
    assert good.completions == 10
    dead_node = next(n for n in eng.nodes if n.url == dead)
    assert dead_node.failures >= 2 and not dead_node.usable(time.monotonic())
    line = await eng.health()
    assert isinstance(line, Degraded) and line == "1/2 vllm serve nodes up (1 ejected)", line


async def test_no_usable_node_fails_at_once_and_readiness_is_down(stack: AsyncExitStack) -> None:
    eng = pool([closed_port_url(), closed_port_url()])
    await eng.start()
    stack.push_async_callback(eng.shutdown)
    with pytest.raises(EngineError) as e:
        await eng.generate([1, 2, 3], ONE)
    assert "127.0.0.1" not in str(e.value)  # the public text names no node
    with pytest.raises(EngineError):
        await eng.health()


async def test_node_with_other_weights_is_refused(stack: AsyncExitStack) -> None:
    good, other = StandIn(), StandIn(fingerprint="0" * 32)
    url = await stack.enter_async_context(serve(good.app))
    other_url = await stack.enter_async_context(serve(other.app))
    eng = pool([other_url, url])
    await eng.start()
    stack.push_async_callback(eng.shutdown)
    for _ in range(4):
        await eng.generate([1, 2, 3], ONE)
    assert other.completions == 0 and good.completions == 4
    line = await eng.health()
    assert isinstance(line, Degraded) and "fingerprint" in line
    refused = next(n for n in eng.nodes if n.url == other_url)
    assert refused.refused is not None and "0" * 32 in refused.refused


async def test_node_of_another_parallel_world_is_refused(stack: AsyncExitStack) -> None:
    """A node whose workers split the model otherwise (2 x 1 against the gateway's 1 x 1)
    stores chunks under other shard keys: it is refused like a node of other weights."""
    good, split = StandIn(), StandIn(world=(2, 1))
    url = await stack.enter_async_context(serve(good.app))
    split_url = await stack.enter_async_context(serve(split.app))
    eng = pool([split_url, url])
    await eng.start()
    stack.push_async_callback(eng.shutdown)
    for _ in range(4):
        await eng.generate([1, 2, 3], ONE)
    assert split.completions == 0 and good.completions == 4
    refused = next(n for n in eng.nodes if n.url == split_url)
    assert refused.refused is not None and "2 x 1" in refused.refused
    # a gateway of that world takes it (and refuses the other)
    eng2 = RemoteEngine(MODEL, [split_url, url], max_failures=2, probe_every_s=3600.0, world=(2, 1))
    await eng2.start()
    stack.push_async_callback(eng2.shutdown)
    await eng2.generate([1, 2, 3], ONE)
    assert split.completions == 1 and good.completions == 4


async def test_only_mismatched_nodes_means_no_engine(stack: AsyncExitStack) -> None:
    other = StandIn(fingerprint="0" * 32)
    url = await stack.enter_async_context(serve(other.app))
    eng = pool([url])
    await eng.start()
    stack.push_async_callback(eng.shutdown)
    with pytest.raises(EngineError):
        await eng.generate([1, 2, 3], ONE)
    assert other.completions == 0
    with pytest.raises(EngineError) as e:
        await eng.health()
    assert "refused" in str(e.value) and e.value.detail and "fingerprint" in e.value.detail


async def test_ejected_node_is_taken_back_by_a_probe_after_its_cooldown(
    stack: AsyncExitStack,
) -> None:
    good = StandIn()
    url = await stack.enter_async_context(serve(good.app))
    eng = pool([url], cooldown_s=0.0)
    await eng.start()
    stack.push_async_callback(eng.shutdown)
    node = eng.nodes[0]
    node.failures, node.ejected_until = 5, 0.0  # as after a run of failures
    await eng.probe()
    assert node.failures == 0
    assert (await eng.health()) == "1/1 vllm serve nodes up"


async def test_in_flight_limit_holds_requests_until_a_slot_frees(stack: AsyncExitStack) -> None:
    nodes = [StandIn(), StandIn()]
    urls = [await stack.enter_async_context(serve(n.app)) for n in nodes]
    eng = pool(urls, node_max_inflight=1)  # type: ignore[arg-type]
    await eng.start()
    stack.push_async_callback(eng.shutdown)
    for n in nodes:
        n.gate.clear()
    tasks = [asyncio.create_task(eng.generate([1, 2, 3], ONE)) for _ in range(5)]
    await asyncio.gather(*(n.arrived.wait() for n in nodes))
    await asyncio.sleep(0.2)  # room for a wrongly admitted third request to arrive
    assert [n.active for n in nodes] == [1, 1]  # the other three wait in the gateway
    assert sum(1 for t in tasks if not t.done()) == 5
    for n in nodes:
        n.gate.set()
    done = await asyncio.gather(*tasks)
    assert all(g.token_ids == [7] for g in done)
    assert [n.most_active for n in nodes] == [1, 1]
    assert sum(n.completions for n in nodes) == 5


async def test_attaches_follow_the_node_that_served_the_cache(stack: AsyncExitStack) -> None:
    nodes = [StandIn(), StandIn()]
    urls = [await stack.enter_async_context(serve(n.app)) for n in nodes]
    eng = pool(urls)
    await eng.start()
    stack.push_async_callback(eng.shutdown)
    plan = TransferPlan("load", (b"\x01" * 32, b"\x02" * 32), 256)
    nodes[0].gate.clear()
    busy = asyncio.create_task(eng.generate([9], ONE))  # holds node 0
    await asyncio.sleep(0)
    await eng.generate([1, 2, 3], ONE, plan)  # node 1: the idler one
    nodes[0].gate.set()
    await busy
    before = ROUTES.labels(urls[1], "affinity")._value.get()
    for _ in range(4):
        await eng.generate([1, 2, 3], ONE, plan)
    assert nodes[1].completions == 5 and nodes[0].completions == 1
    assert ROUTES.labels(urls[1], "affinity")._value.get() - before == 4


async def test_an_ejected_node_gets_no_request_after_its_cooldown_until_a_probe(
    stack: AsyncExitStack,
) -> None:
    """The cool-down only lets a probe take the node back; a request never tests it."""
    good = StandIn()
    url = await stack.enter_async_context(serve(good.app))
    eng = pool(["http://127.0.0.1:9", url], cooldown_s=0.0)  # port 9: nothing listens
    await eng.start()
    stack.push_async_callback(eng.shutdown)
    dead = eng.nodes[0]
    for _ in range(2):
        eng._failed(dead, "connection refused")
    assert dead.ejected and dead.ejected_until <= time.monotonic()  # cool-down over
    assert not dead.usable(time.monotonic())
    failures = dead.failures
    for _ in range(4):
        await eng.generate([1, 2, 3], ONE)
    assert good.completions == 4
    assert dead.failures == failures  # no request was sent to find out it is still down
    await eng.probe()  # the dead node's probe fails: still out
    assert dead.ejected and dead.failures == failures + 1
