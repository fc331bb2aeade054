"""The TTFT bench's short run, in the suite (``bench/ttft.py --quick --rounds 2``): one engine
serves every configuration, and every attach sample really loads from the store it was routed
to (the bench refuses a sample whose prompt tokens were computed instead). Speed is reported
by the bench, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ttft.py"


def test_every_configuration_is_sampled_in_one_engine(tmp_path: Path) -> None:
    out = tmp_path / "ttft.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--rounds", "2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {(r["load"], r["config"]): r for r in doc["rows"]}
    attach = {
        f"kvaas-{tier}-int4{suffix}"
        for tier in ("memory", "redis", "disk")
        for suffix in ("", "-plain")
    }
    # the gateway's checked plans beside unchecked ones, which the scheduler looks up itself
    unchecked = {"kvaas-redis-int4-lookup", "kvaas-disk-int4-lookup"}
    expected = attach | unchecked | {"vllm-prefix-hit", "example-connector"}
    for load in ("idle", "loaded"):
        assert {c for ld, c in rows if ld == load} >= expected, sorted(rows)
        for config in expected:
            assert rows[(load, config)]["n"] == 1, rows[(load, config)]
    assert rows[("idle", "cold")]["n"] == 1
    # the encrypted rows carry their cost against the plain ones and the AES-GCM open time
    enc = rows[("idle", "kvaas-redis-int4")]
    assert enc["vs_unencrypted"] > 0 and enc["open_ms_per_attach"] > 0
    tiny = doc["meta"]["models"]["tiny"]
    assert tiny["cached/1024"] > 0  # the tokens every attach had to load
    # the docs tables are made from this file
    md = subprocess.run(
        [sys.executable, str(BENCH), "--markdown", str(out)], capture_output=True, text=True
    )
    assert md.returncode == 0 and "KVaaS memory, int4, encrypted" in md.stdout
    assert "KVaaS disk, int4, encrypted, unchecked plan" in md.stdout
