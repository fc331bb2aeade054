"""The HTTP TTFT bench's short run, in the suite (``bench/ttft_http.py --quick --rounds 2``):
two real ``kvaas serve`` processes, every configuration sampled, and every attach (streamed,
through the chat route, and 8 at once) a hit whose cached tokens came from the store, on a
gateway whose vLLM prefix cache is off, so nothing was recomputed. The bench itself stops on a
sample that did not load; here the rows' shape and token counts are checked. Speed is reported
by the bench, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ttft_http.py"
TOKENS = 1024  # the --quick length
ROUNDS = 2
TTFT_ROWS = {"cold", "vllm-prefix-hit", "attach", "chat-attach", "attach-engine"}
RATE_ROWS = {"attach-x8", "prefix-hit-x8"}


def test_attach_through_http_loads_every_cached_token(tmp_path: Path) -> None:
    out = tmp_path / "ttft_http.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--rounds", str(ROUNDS), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {r["config"]: r for r in doc["rows"]}
    assert {r["tokens"] for r in doc["rows"]} == {TOKENS}
    assert set(rows) == TTFT_ROWS | RATE_ROWS | {"gateway-overhead", "get-cache"}
    for config, r in rows.items():
        assert r["n"] == len(r["samples"]) == ROUNDS, r
        assert r["p25"] <= r["p50"] <= r["p75"], r
        assert r["unit"] == ("tokens/s" if config in RATE_ROWS else "ms"), r
        if config not in ("gateway-overhead", "get-cache"):
            lo, hi = r["vs_prefix_hit_ci95"]
            assert lo <= r["vs_prefix_hit"] <= hi, r
    # loaded, not recomputed: the store gateway's prefix cache is off, so every cached token
    # of an attach came through the connector; a cold prompt has none
    assert rows["attach"]["cached_tokens"] == rows["chat-attach"]["cached_tokens"] == TOKENS
    assert rows["attach-x8"]["cached_tokens"] == 8 * TOKENS
    assert rows["cold"]["cached_tokens"] == 0
    assert rows["vllm-prefix-hit"]["cached_tokens"] >= TOKENS
    assert rows["prefix-hit-x8"]["cached_tokens"] >= 8 * TOKENS
    assert rows["vllm-prefix-hit"]["vs_prefix_hit"] == 1.0
    # the gateway's share is the client's TTFT less the engine's, request by request
    overhead = rows["gateway-overhead"]["samples"]
    client, engine = rows["attach"]["samples"], rows["attach-engine"]["samples"]
    assert overhead == pytest.approx([c - e for c, e in zip(client, engine, strict=True)], abs=0.02)
    # the docs table is made from this file
    md = subprocess.run(
        [sys.executable, str(BENCH), "--markdown", str(out)], capture_output=True, text=True
    )
    assert md.returncode == 0 and "gateway overhead" in md.stdout, md.stderr
