"""Remote node pool health: a node that refuses connections is ejected and the request goes to
another node, a node serving other weights is refused, readiness reports k of N.

The nodes here are small HTTP servers on real sockets that answer the routes the gateway uses
(``/health``, ``/kvaas/fingerprint``, ``/v1/models``, ``/v1/completions``) as ``python -m
kvaas.engine.node`` does; a node that is down is a port nobody listens on. The real node,
started by the printed command and killed, is in ``tests/faults/test_remote_node_kill.py``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from kvtest.serve import serve

from kvaas.engine import Degraded, EngineError, ModelInfo, Sampling
from kvaas.engine.remote import RemoteEngine

FINGERPRINT = "f" * 32
MODEL = ModelInfo(path=Path("/nonexistent"), name="tiny", fingerprint=FINGERPRINT, tokenizer=None)


class StandIn:
    """One node: counts the completions it served."""

    def __init__(self, fingerprint: str = FINGERPRINT) -> None:
        self.completions = 0
        self.up = True
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {}

        @app.get("/kvaas/fingerprint")
        async def fp() -> dict[str, str]:
            return {"fingerprint": fingerprint}

        @app.get("/v1/models")
        async def models() -> dict[str, list[dict[str, object]]]:
            return {"data": [{"id": "tiny", "max_model_len": 2048}]}

        @app.post("/v1/completions")
        async def complete(request: Request) -> dict[str, object]:
            body = await request.json()
            self.completions += 1
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
    # the start-up probe already failed once on the dead node; it still has 0 in flight
    for _ in range(10):
        g = await eng.generate([1, 2, 3], ONE)
        assert g.token_ids == [7]
    assert good.completions == 10
    dead_node = next(n for n in eng.nodes if n.url == dead)
    assert dead_node.failures >= 2 and not dead_node.usable(time.monotonic())
    line = await eng.health()
    assert isinstance(line, Degraded) and line.startswith("1/2")


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
