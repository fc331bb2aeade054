"""Remote engine nodes: no secret on their command line (any local user reads it in ``ps``),
and the gateway authenticates every request it sends them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kvtest.serve import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kvaas.connector import store_config
from kvaas.engine import EngineError, Sampling
from kvaas.engine.node_command import serve_command
from kvaas.engine.remote import RemoteEngine
from kvaas.store.factory import StoreConfig

PASSWORD = "s3cret-redis-pw"
REDIS_URL = f"redis://:{PASSWORD}@redis.internal:6379/0"
API_KEY = "node-key-0123456789abcdef0123456789abcdef"


def _store() -> dict[str, Any]:
    return StoreConfig(
        memory_bytes=1 << 20, disk_dir=None, disk_bytes=0, redis_url=REDIS_URL
    ).to_dict()


def _transfer_config(argv: list[str]) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(argv[argv.index("--kv-transfer-config") + 1]))


def test_node_argv_carries_no_secret() -> None:
    cmd = serve_command("/models/tiny", "tiny", _store(), port=8100, api_key=API_KEY)
    for arg in cmd.argv:
        assert PASSWORD not in arg and API_KEY not in arg and "redis.internal" not in arg
    assert cmd.env == {"KVAAS_REDIS_URL": REDIS_URL, "VLLM_API_KEY": API_KEY}
    assert "--api-key" not in cmd.argv


def test_node_without_redis_or_key_needs_no_environment() -> None:
    store = StoreConfig(memory_bytes=1 << 20, disk_dir=None, disk_bytes=0, redis_url=None)
    cmd = serve_command("/models/tiny", "tiny", store.to_dict(), port=8100)
    assert cmd.env == {}
    assert store_config(_transfer_config(cmd.argv)["kv_connector_extra_config"]) == store


def test_connector_reads_the_redis_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cmd = serve_command("/models/tiny", "tiny", _store(), port=8100, api_key=API_KEY)
    extra = _transfer_config(cmd.argv)["kv_connector_extra_config"]
    monkeypatch.setenv("KVAAS_REDIS_URL", REDIS_URL)
    assert store_config(extra) == StoreConfig.from_dict(_store())
    monkeypatch.delenv("KVAAS_REDIS_URL")
    with pytest.raises(ValueError, match="KVAAS_REDIS_URL") as e:
        store_config(extra)
    assert PASSWORD not in str(e.value)


def test_engine_command_starts_as_printed(tmp_path: Path) -> None:
    """``kvaas engine command`` prints one shell line; run by a shell, it starts the node
    with the secrets in its environment and the argv of :func:`serve_command`."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    env = {
        "KVAAS_DATA_DIR": str(tmp_path / "data"),
        "KVAAS_MODEL": str(model),
        "KVAAS_REDIS_URL": REDIS_URL,
        "KVAAS_ENGINE_API_KEY": API_KEY,
    }
    r = subprocess.run(
        [sys.executable, "-m", "kvaas.cli", "engine", "command", "--port", "8123"],
        env={**os.environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    # a stand-in `python` that records how it was started
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT/argv"\nenv > "$OUT/env"\n')
    stub.chmod(0o755)
    clean = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path)}
    subprocess.run(["bash", "-c", line], env=clean, check=True, timeout=60)
    argv = (tmp_path / "argv").read_text().splitlines()
    node_env = dict(
        ln.split("=", 1) for ln in (tmp_path / "env").read_text().splitlines() if "=" in ln
    )
    assert node_env["KVAAS_REDIS_URL"] == REDIS_URL
    assert node_env["VLLM_API_KEY"] == API_KEY
    assert argv[:3] == ["-m", "kvaas.engine.node", "--model"]
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(1024**3)  # the 1 GiB default
    assert all(PASSWORD not in a and API_KEY not in a for a in argv)
    extra = _transfer_config(argv)["kv_connector_extra_config"]
    assert extra["store"]["redis_url"] is None and extra["redis_url_env"] == "KVAAS_REDIS_URL"


def _fake_node(seen: list[tuple[str, str | None]]) -> Starlette:
    """A stand-in ``vllm serve`` node that, like vLLM with an API key, refuses ``/v1`` requests
    without it (``/health`` is open) and records every request's credentials."""

    async def handle(request: Request) -> JSONResponse:
        auth = request.headers.get("authorization")
        seen.append((request.url.path, auth))
        if request.url.path.startswith("/v1") and auth != f"Bearer {API_KEY}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        if request.url.path == "/kvaas/fingerprint":
            return JSONResponse({"fingerprint": "tiny-fp"})
        if request.url.path == "/v1/models":
            return JSONResponse({"data": [{"id": "tiny", "max_model_len": 1234}]})
        if request.url.path == "/v1/completions":
            choice = {"text": "x", "token_ids": [5], "finish_reason": "length"}
            return JSONResponse({"choices": [choice], "usage": {"prompt_tokens": 3}})
        return JSONResponse({})

    paths = ["/health", "/kvaas/fingerprint", "/v1/models", "/v1/completions"]
    return Starlette(routes=[Route(p, handle, methods=["GET", "POST"]) for p in paths])


async def test_remote_engine_sends_the_key_on_every_request() -> None:
    seen: list[tuple[str, str | None]] = []
    model = cast(Any, SimpleNamespace(name="tiny", fingerprint="tiny-fp"))
    async with serve(_fake_node(seen)) as url:
        engine = RemoteEngine(model, [url], api_key=API_KEY)
        try:
            await engine.start()
            assert engine.max_model_len == 1234
            assert "1/1" in await engine.health()
            g = await engine.generate([1, 2, 3], Sampling(max_tokens=1))
            assert g.token_ids == [5]
        finally:
            await engine.shutdown()
        paths = {"/v1/models", "/health", "/kvaas/fingerprint", "/v1/completions"}
        assert {p for p, _ in seen} == paths
        assert all(auth == f"Bearer {API_KEY}" for _, auth in seen)

        seen.clear()
        keyless = RemoteEngine(model, [url])
        try:
            with pytest.raises(EngineError):
                await keyless.generate([1, 2, 3], Sampling(max_tokens=1))
        finally:
            await keyless.shutdown()
        assert seen == [("/v1/completions", None)]
