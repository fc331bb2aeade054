"""The README's first command as a real process: ``kvaas serve`` on its embedded defaults.

No ``KVAAS_*`` variable is set and the working directory is a fresh one, so the service uses
what the README promises: SQLite and the disk tier under ``./.kvaas``, no Redis, the in-process
vLLM engine on the built-in ``tiny`` model (its own worker memory tier beside the disk tier),
vLLM's prefix cache on. Tenants are made with the ``kvaas`` CLI on the same directory, and
everything else goes over HTTP.

A cache is created, attached, extended and attached again, each output compared with a cold
run of the same tokens through ``/v1/completions`` by a second tenant (another cache salt, so
none of the first tenant's KV is reused). The gateway is then stopped and started again on the
same directory: the engine's own memory is empty, so the attaches must load every chunk from
the disk tier, with the cache's rows read from the same SQLite file. Finally the cache is
deleted and answers 404.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench._serve import Gateway, ServeError, clean_env
from kvaas.engine.model_info import ModelInfo
from kvaas.model_presets import resolve_model

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KVAAS = Path(sys.executable).with_name("kvaas")  # the console script `scripts/serve` runs
READY_TIMEOUT_S = 240.0
STOP_GRACE_S = 30.0
CHUNK = 256  # the default KVAAS_CHUNK_TOKENS
MAX_TOKENS = 16


def _env() -> dict[str, str]:
    """This environment without a single ``KVAAS_`` variable (the suite sets several)."""
    return clean_env()


def _log_tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def kvaas_serve(cwd: Path, log: Path) -> Iterator[Gateway]:
    """``kvaas serve --port <free>`` in ``cwd`` with no ``KVAAS_`` settings, once ``/readyz``
    answers 200. Fails the test with the log's tail when the process exits or is not ready
    within ``READY_TIMEOUT_S``; stopped on exit (SIGTERM, then SIGKILL to its group)."""
    gw = Gateway({}, log, cwd=cwd, ready_timeout_s=READY_TIMEOUT_S, grace_s=STOP_GRACE_S)
    try:
        try:
            gw.launch().wait_ready()
        except ServeError as e:
            pytest.fail(str(e))
        yield gw
    finally:
        gw.stop()


def _cli(cwd: Path, *args: str) -> str:
    r = subprocess.run(
        [str(KVAAS), *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout.strip()


def _chunk_files(data_dir: Path) -> list[Path]:
    """The disk tier's chunk files (its index database excluded)."""
    return [
        p for p in (data_dir / "chunks").rglob("*") if p.is_file() and p.parent.name != "chunks"
    ]


def _cache_row(data_dir: Path, cache_id: str) -> tuple[Any, ...] | None:
    with contextlib.closing(sqlite3.connect(data_dir / "kvaas.db")) as db:
        return db.execute(
            "SELECT status, version, tokens FROM caches WHERE id = ?", (cache_id,)
        ).fetchone()


def _attach(c: httpx.Client, key: str, cache_id: str, version: int, q: list[int]) -> Any:
    r = c.post(
        "/v1/cache/attach",
        json={
            "cache_id": cache_id,
            "version": version,
            "token_ids": q,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
        },
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 200, r.text
    return r.json()


def _cold(c: httpx.Client, key: str, ids: list[int]) -> Any:
    r = c.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0.0},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cache"] is None
    return body


def _assert_hit(body: Any, cache: Any, prompt_tokens: int, block: int) -> None:
    """A hit that loaded every stored token down to the engine's ``block`` size."""
    cached = cache["stored_tokens"] // block * block
    assert body["cache"] == {"id": cache["id"], "hit": True, "miss_reason": None}
    assert body["usage"]["cached_tokens"] == cached
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["prefill_tokens"] == prompt_tokens - cached


def _assert_same_as_cold(body: Any, cold: Any) -> None:
    got, want = body["choices"][0], cold["choices"][0]
    assert got["text"] == want["text"]
    assert len(got["token_ids"]) == cold["usage"]["completion_tokens"] == MAX_TOKENS
    assert got["finish_reason"] == want["finish_reason"]
    assert body["usage"]["prompt_tokens"] == cold["usage"]["prompt_tokens"]


def test_readme_default_serves_caches_across_a_restart(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    data_dir = work / ".kvaas"
    logs = tmp_path / "logs"
    logs.mkdir()

    with kvaas_serve(work, logs / "serve-1.log") as gw:
        with httpx.Client(base_url=gw.url, timeout=120) as c:
            ready = c.get("/readyz").json()["components"]
        assert ready["database"]["detail"] == "sqlite"
        assert "redis" not in ready["store"]["detail"]
        assert "in-process, tiny" in ready["engine"]["detail"]
        found = re.search(r"block size (\d+)", ready["engine"]["detail"])
        assert found is not None
        block = int(found.group(1))
        assert (data_dir / "kvaas.db").is_file()

        owner = _cli(work, "tenants", "create", "embedded-owner")
        other = _cli(work, "tenants", "create", "embedded-other")
        model = ModelInfo.load(resolve_model("tiny", data_dir), "tiny", "auto")
        ids = model.encode(Path(os.__file__).read_text()[:12_000])
        prefix, appendix = ids[: 3 * CHUNK], ids[3 * CHUNK : 3 * CHUNK + 300]
        assert len(appendix) == 300
        q = model.encode("\n\ndef main():\n", add_special_tokens=False)
        auth = {"Authorization": f"Bearer {owner}"}

        with httpx.Client(base_url=gw.url, timeout=120) as c:
            r = c.post(
                "/v1/cache/create",
                json={"token_ids": prefix, "compression": "lossless"},
                headers=auth,
            )
            assert r.status_code == 201, r.text
            v1 = r.json()
            assert (v1["status"], v1["version"], v1["storage_class"]) == (
                "ready",
                1,
                "standard",
            )
            assert v1["tokens"] == v1["stored_tokens"] == 3 * CHUNK
            assert len(_chunk_files(data_dir)) == 3  # standard without Redis: the disk tier
            assert _cache_row(data_dir, v1["id"]) == ("ready", 1, 3 * CHUNK)

            att1 = _attach(c, owner, v1["id"], 1, q)
            _assert_hit(att1, v1, len(prefix) + len(q), block)
            cold1 = _cold(c, other, prefix + q)
            assert cold1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            _assert_same_as_cold(att1, cold1)

            r = c.post(f"/v1/caches/{v1['id']}/extend", json={"token_ids": appendix}, headers=auth)
            assert r.status_code == 201, r.text
            v2 = r.json()
            assert (v2["version"], v2["tokens"]) == (2, len(prefix) + len(appendix))
            assert v2["stored_tokens"] == len(prefix) + len(appendix)  # the partial chunk too
            assert v2["usage"]["prefill_tokens"] == len(appendix)
            # version 2 shares version 1's three, and adds a full chunk and a partial one
            assert len(_chunk_files(data_dir)) == 5

            att2 = _attach(c, owner, v2["id"], 2, q)
            _assert_hit(att2, v2, len(prefix) + len(appendix) + len(q), block)
            _assert_same_as_cold(att2, _cold(c, other, prefix + appendix + q))

        gw.stop()  # a graceful stop: uvicorn re-raises the SIGTERM it handled
        assert gw.proc is not None
        assert gw.proc.returncode == -signal.SIGTERM, _log_tail(logs / "serve-1.log")
        assert "Application shutdown complete." in _log_tail(logs / "serve-1.log", 500)

    # A new process: vLLM's prefix cache and the worker's memory tier start empty, so each
    # attach loads its chunks from the disk tier.
    with kvaas_serve(work, logs / "serve-2.log") as gw:
        with httpx.Client(base_url=gw.url, timeout=120) as c:
            again1 = _attach(c, owner, v1["id"], 1, q)
            _assert_hit(again1, v1, len(prefix) + len(q), block)
            assert again1["choices"][0]["token_ids"] == att1["choices"][0]["token_ids"]
            again2 = _attach(c, owner, v2["id"], 2, q)
            _assert_hit(again2, v2, len(prefix) + len(appendix) + len(q), block)
            assert again2["choices"][0]["token_ids"] == att2["choices"][0]["token_ids"]

            r = c.delete(f"/v1/caches/{v1['id']}", headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "deleted"
            r = c.get(f"/v1/caches/{v1['id']}", headers=auth)
            assert r.status_code == 404, r.text
            r = c.post(
                "/v1/cache/attach",
                json={"cache_id": v1["id"], "token_ids": q, "max_tokens": 1},
                headers=auth,
            )
            assert r.status_code == 404, r.text
        assert _cache_row(data_dir, v1["id"]) == ("deleted", 2, len(prefix) + len(appendix))
