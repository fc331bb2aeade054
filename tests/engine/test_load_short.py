"""The load bench's short run, in the suite: many tenants' mixed requests against a real
gateway process on PostgreSQL and Redis (``bench/load.py --quick``, shortened) end with no
5xx, no transport error and every attach a store hit. Speed and memory are reported by the
bench, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "load.py"


def test_mixed_load_has_no_server_errors(tmp_path: Path, pg_schema, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--duration", "15", "--json", str(out)]
    cmd += ["--database-url", pg_schema.url, "--redis-url", redis_url]
    cmd += ["--log", str(tmp_path / "gateway.log")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    log = (tmp_path / "gateway.log").read_text(errors="replace")[-4000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log
    res = json.loads(out.read_text())
    assert res["errors_5xx"] == 0 and res["transport_errors"] == 0, (res["outcomes"], log)
    statuses = {k.split()[-1] for k in res["outcomes"]}
    assert statuses <= {"200", "201", "429"}, res["outcomes"]
    assert {"attach", "create", "get", "list"} <= set(res["per_op"]), res["per_op"]
    assert res["attach_hit_rate"] == 1.0  # nothing is evicted at this size: a miss is a bug
    assert res["memory"]["samples"], "the gateway's memory was never sampled"
