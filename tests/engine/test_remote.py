"""The remote path: a real `vllm serve` node started with the KVaaS connector, driven by a
gateway with KVAAS_ENGINE=remote over HTTP, sharing the store with the in-process gateway."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from kvtest.gateway import new_tenant, serving

from kvaas.engine import Sampling, kv_dtype
from kvaas.engine.node_command import serve_command
from kvaas.engine.options import EngineOptions
from kvaas.engine.priorities import ALONE, ENGINE_PRIORITY, SHARED
from kvaas.model_presets import resolve_model
from kvaas.store.factory import StoreConfig

from .conftest import Gateway, engine_settings

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

#: The node's API key: it runs with ``VLLM_API_KEY`` and the gateway sends it.
NODE_KEY = "node-key-" + "5e" * 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_node(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    s = gateway.settings
    model_dir = resolve_model(s.model, s.data_dir / "models")
    port = _free_port()
    cmd = serve_command(
        str(model_dir),
        s.model,
        StoreConfig.from_settings(s).to_dict(),
        port=port,
        api_key=NODE_KEY,
        options=EngineOptions(
            dtype=kv_dtype(model_dir, s.engine_dtype),
            max_model_len=s.engine_max_model_len,
            max_num_batched_tokens=s.engine_max_batched_tokens,
            prefix_caching=False,
        ),
    )
    argv = [sys.executable, *cmd.argv[1:]]
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {**os.environ, **cmd.env, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
async def remote_gateway(gateway: Gateway, vllm_node: str) -> AsyncIterator[Gateway]:
    s = gateway.settings
    settings = engine_settings(
        s.data_dir,
        s.resolved_database_url,
        engine="remote",
        engine_urls=[vllm_node],
        engine_api_key=NODE_KEY,
        redis_prefix=s.redis_prefix,
        auto_migrate=False,
    )
    async with serving(settings, request_timeout_s=300) as (app, client):
        _t, key = await new_tenant(client, "remote-a")
        yield Gateway(app, client, settings, key, key)


async def test_remote_attach_matches_cold_in_process_run(
    gateway: Gateway, remote_gateway: Gateway
) -> None:
    model = gateway.app.state.engine.model
    text = Path(os.path.__file__).read_text()  # noqa: ASYNC240 - a small local file
    ids = model.encode(text)[:900]
    extra = model.encode(text, add_special_tokens=False)[900:911]
    c = remote_gateway.client
    r = await c.post(
        "/v1/cache/create",
        json={"token_ids": ids, "compression": "none", "storage_class": "hot"},
        headers=remote_gateway.auth(),
    )
    assert r.status_code == 201, r.text
    cache = r.json()
    assert cache["stored_tokens"] == 900
    r = await c.post(
        "/v1/cache/attach",
        json={
            "cache_id": cache["id"],
            "token_ids": extra,
            "max_tokens": 6,
            "temperature": 0.0,
            "logprobs": 5,
        },
        headers=remote_gateway.auth(),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cache"]["hit"] is True
    bs = gateway.app.state.engine.block_size
    assert body["usage"]["cached_tokens"] == 900 // bs * bs
    ref = await gateway.app.state.engine.generate(
        ids + extra, Sampling(max_tokens=6, temperature=0.0, logprobs=5)
    )
    assert body["choices"][0]["token_ids"] == ref.token_ids
    first = {int(t): v for t, v in body["choices"][0]["logprobs"][0].items()}
    for tok, lp in ref.logprobs[0].items():
        if tok in first:
            assert abs(first[tok] - lp) < 1e-4


async def test_node_answers_only_the_gateway_key(remote_gateway: Gateway, vllm_node: str) -> None:
    """The node requires its key on its API; the gateway's engine sends it on every call."""
    async with httpx.AsyncClient(base_url=vllm_node, timeout=30) as c:
        assert (await c.get("/v1/models")).status_code == 401
        bad = {"Authorization": "Bearer not-the-key"}
        assert (await c.get("/v1/models", headers=bad)).status_code == 401
        r = await c.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3]})
        assert r.status_code == 401
        ok = await c.get("/v1/models", headers={"Authorization": f"Bearer {NODE_KEY}"})
        assert ok.status_code == 200
    engine = remote_gateway.app.state.engine
    assert "1/1" in await engine.health()
    g = await engine.generate([1, 2, 3, 4], Sampling(max_tokens=2, temperature=0.0))
    assert len(g.token_ids) == 2


async def test_node_takes_the_gateways_request_priorities(remote_gateway: Gateway) -> None:
    """The node runs the fair step scheduler: a request sent with the priority of another
    tenant's bulk work is served (vLLM refuses any priority but 0 under its default policy)."""
    engine = remote_gateway.app.state.engine
    ids = engine.model.encode("def main():\n    return 0\n")
    for priority in (ALONE, SHARED):
        ENGINE_PRIORITY.set(priority)  # as the fair gate's slot sets it
        gen = await engine.generate(ids, Sampling(max_tokens=2, temperature=0.0))
        assert len(gen.token_ids) == 2
