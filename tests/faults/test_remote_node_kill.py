"""A remote engine node started by exactly the command ``kvaas engine command`` prints (no
``VLLM_CPU_KVCACHE_SPACE`` of the test's own), in a pool with a node that refuses
connections, then SIGKILLed and started again:

- with one node down the pool serves (the refused connection is retried on the live node) and
  readiness says ``degraded`` (1 of 2);
- with the live node killed, requests answer 503 ``engine_unavailable``, readiness is down and
  ``/healthz`` says the engine is recovering (restarting the gateway would not help);
- once the node is started again, a probe takes it back and the service answers again, with
  the caches made before the crash.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvtest.services import REDIS_URL, PgSchema

from .conftest import Gateway, fault_settings, running_gateway

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

NODE_KEY = "node-key-" + "7a" * 16
VENV_BIN = str(Path(sys.executable).parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrintedNode:
    """A node run as ``bash -c '<printed line>'`` in its own process group."""

    def __init__(self, line: str, log: Path, port: int) -> None:
        self.line, self.log, self.url = line, log, f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # an operator's shell: the venv's python first on PATH, nothing else of the tests'
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "KVAAS_"))}
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", self.line],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_serving(self, limit_s: float = 600) -> None:
        deadline = time.monotonic() + limit_s
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the node exited as printed:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the node did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(1)

    def kill(self) -> None:
        """SIGKILL the node and every process it started (its engine core, its worker)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def printed_command(settings_env: dict[str, str], port: int) -> str:
    """What ``kvaas engine command`` prints for these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVAAS_")}
    out = subprocess.run(
        [f"{VENV_BIN}/kvaas", "engine", "command", "--port", str(port)],
        env={**env, **settings_env},
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def node_and_settings(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[PrintedNode, dict[str, str], Path]]:
    data_dir = tmp_path_factory.mktemp("remote-kill")
    prefix = f"kvfault-{os.getpid()}-{_free_port()}"
    # the gateway's settings, as an operator would have them in the environment
    settings_env = {
        "KVAAS_DATA_DIR": str(data_dir),
        "KVAAS_MODEL": "tiny",
        "KVAAS_REDIS_URL": REDIS_URL,
        "KVAAS_REDIS_PREFIX": prefix,
        "KVAAS_ENGINE_API_KEY": NODE_KEY,
        "KVAAS_CHUNK_TOKENS": "256",
        "KVAAS_ENGINE_MAX_MODEL_LEN": "2048",
        "KVAAS_ENGINE_MAX_BATCHED_TOKENS": "1024",
        "KVAAS_ENGINE_PREFIX_CACHING": "false",
        "KVAAS_ENGINE_KV_CACHE_GIB": "1",
        "KVAAS_DISK_TIER_BYTES": str(1024**3),
        "KVAAS_MEMORY_TIER_BYTES": str(64 * 1024**2),
    }
    port = _free_port()
    line = printed_command(settings_env, port)
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ or "--kv-cache-memory-bytes" in line
    node = PrintedNode(line, data_dir / "node.log", port)
    node.start()
    try:
        node.wait_serving()
        yield node, settings_env, data_dir
    finally:
        node.kill()


@pytest.fixture(scope="module")
async def remote(
    node_and_settings: tuple[PrintedNode, dict[str, str], Path],
) -> AsyncIterator[tuple[Gateway, PrintedNode]]:
    node, env, data_dir = node_and_settings
    pg = PgSchema()
    try:
        settings = fault_settings(
            data_dir,
            pg.url,
            engine="remote",
            engine_urls=[f"http://127.0.0.1:{_free_port()}", node.url],  # the first: refused
            engine_api_key=NODE_KEY,
            redis_prefix=env["KVAAS_REDIS_PREFIX"],
            memory_tier_bytes=int(env["KVAAS_MEMORY_TIER_BYTES"]),
            disk_tier_bytes=int(env["KVAAS_DISK_TIER_BYTES"]),
            engine_node_max_failures=2,
            engine_node_cooldown_seconds=1.0,
            engine_node_probe_seconds=0.5,
        )
        async with running_gateway(settings) as g:
            yield g, node
    finally:
        pg.drop()


async def wait_for(predicate: Any, what: str, limit_s: float = 600.0) -> None:
    deadline = time.monotonic() + limit_s
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {limit_s:g} s")
        await asyncio.sleep(0.5)


async def test_printed_node_killed_and_restarted(remote: tuple[Gateway, PrintedNode]) -> None:
    g, node = remote
    c = g.client
    r = await c.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "degraded"
    assert r.json()["components"]["engine"]["detail"].startswith("1/2")

    ids = [(13 * i + 1) % 800 + 30 for i in range(300)]
    r = await c.post(
        "/v1/cache/create", json={"token_ids": ids, "compression": "none"}, headers=g.auth()
    )
    assert r.status_code == 201, r.text
    cache_id = r.json()["id"]
    attach = {"cache_id": cache_id, "token_ids": [4, 5], "max_tokens": 2, "temperature": 0.0}
    for _ in range(5):  # every request reaches the live node, whatever the refused one does
        r = await c.post("/v1/cache/attach", json=attach, headers=g.auth())
        assert r.status_code == 200, r.text
        assert r.json()["cache"]["hit"] is True

    node.kill()
    r = await c.post("/v1/cache/attach", json=attach, headers=g.auth())
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "engine_unavailable"
    assert "127.0.0.1" not in r.text  # no node address reaches the caller

    async def down() -> bool:
        return (await c.get("/readyz")).status_code == 503

    await wait_for(down, "readiness going down", limit_s=60)
    live = (await c.get("/healthz")).json()
    assert live["status"] == "ok" and live["engine"] == "recovering"
    r = await c.post(
        "/v1/cache/create", json={"token_ids": ids[:280], "compression": "none"}, headers=g.auth()
    )
    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"

    started = time.monotonic()
    await asyncio.to_thread(node.start)
    await asyncio.to_thread(node.wait_serving)
    serving = time.monotonic()

    async def back() -> bool:
        return (await c.get("/readyz")).status_code == 200

    await wait_for(back, "the node taken back", limit_s=60)
    print(
        f"[fault] node restarted: serving after {serving - started:.1f} s, "
        f"taken back {time.monotonic() - serving:.1f} s later"
    )
    r = await c.post("/v1/cache/attach", json=attach, headers=g.auth())
    assert r.status_code == 200, r.text
    assert r.json()["cache"]["hit"] is True
    assert (await c.get("/healthz")).json()["engine"] == "ok"
