"""Load: many tenants, a realistic request mix, for minutes, against a real gateway process.

Starts ``kvaas serve`` as a process of its own (the ``tiny`` model on the in-process engine;
the embedded SQLite database and local tiers, or ``--database-url`` / ``--redis-url``), creates
``--tenants`` tenants through the admin API, each with a key and two base caches, then drives
it from a separate load process (an httpx async client, ``--concurrency`` workers, loopback
only) for ``--duration`` seconds or ``--max-requests`` requests, whichever ends first. Each
worker picks a tenant at random and an operation by weight:

=========  ======  ==================================================================
operation  weight  request
=========  ======  ==================================================================
attach       35 %  ``POST /v1/cache/attach`` on one of the tenant's caches (8 new tokens)
get          15 %  ``GET /v1/caches/{id}``
list         15 %  ``GET /v1/caches?limit=20``
create       15 %  ``POST /v1/cache/create`` of a new 512-token prefix
usage        10 %  ``GET /v1/usage``
delete       10 %  ``DELETE /v1/caches/{id}`` of a cache the worker created
=========  ======  ==================================================================

It reports requests/s and p50/p99 latency per operation, outcomes by status (``5xx`` must be
zero; ``429`` is the service refusing a tenant's excess, counted apart), the store hit rate of
attaches (the share whose cache loaded from the store), and the resident memory of the gateway
process and of its engine processes sampled every 2 s (the growth after warm-up: the last
quarter's mean against the second quarter's).

    python bench/load.py [--quick] [--json PATH] [--duration S] [--tenants N]
                         [--concurrency C] [--max-requests N]

``--quick`` runs 30 s with 4 tenants and 8 workers. The load process, the gateway and its
engine share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from _serve import ServeError, serve

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "load-bench-admin-token-0123456789abcdef"
CACHE_TOKENS = 512
VOCAB = 4000  # token ids drawn below the tiny model's vocabulary (4,096)
READY_TIMEOUT_S = 600.0
MIX = {"attach": 35, "get": 15, "list": 15, "create": 15, "usage": 10, "delete": 10}


@contextlib.contextmanager
def gateway(
    data_dir: Path, database_url: str | None, redis_url: str | None, log: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``kvaas serve`` on a free loopback port, once ``/readyz`` answers 200: (URL, process).
    Stopped (SIGTERM, then SIGKILL to its process group) on exit."""
    env = {
        "KVAAS_DATA_DIR": str(data_dir),
        "KVAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "KVAAS_MODEL": "tiny",
        "KVAAS_ENGINE": "inprocess",
        "KVAAS_ENGINE_KV_CACHE_GIB": "2",
        "KVAAS_LOG_LEVEL": "warning",
    }
    if database_url:
        env["KVAAS_DATABASE_URL"] = database_url
    if redis_url:
        env["KVAAS_REDIS_URL"] = redis_url
    try:
        with serve(env, log, ready_timeout_s=READY_TIMEOUT_S) as gw:
            assert gw.proc is not None
            yield gw.url, gw.proc
    except ServeError as e:
        raise SystemExit(f"{e}\n(log: {log})") from e


class MemorySampler:
    """Resident memory of a process (``gateway``) and of its descendants (``engine``: vLLM's
    engine core and workers), in MiB, every ``every_s`` seconds, in a thread."""

    def __init__(self, pid: int, every_s: float = 2.0) -> None:
        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _sample(self) -> dict[str, float]:
        engine = 0
        for child in self.proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                engine += child.memory_info().rss
        return {
            "t_s": round(time.monotonic() - self._t0, 1),
            "gateway_mib": round(self.proc.memory_info().rss / 2**20, 1),
            "engine_mib": round(engine / 2**20, 1),
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append(self._sample())
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth(self, key: str) -> dict[str, float]:
        """Mean of the second quarter (after warm-up) and of the last quarter, and their ratio."""
        xs = [s[key] for s in self.samples]
        if len(xs) < 8:
            return {"warm_mib": 0.0, "end_mib": 0.0, "ratio": 1.0}
        q = len(xs) // 4
        warm, end = statistics.fmean(xs[q : 2 * q]), statistics.fmean(xs[-q:])
        return {"warm_mib": round(warm, 1), "end_mib": round(end, 1), "ratio": round(end / warm, 3)}


def _setup(url: str, tenants: int) -> list[dict[str, Any]]:
    """``tenants`` tenants, each with an API key and two base caches (never deleted)."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    out = []
    rng = random.Random(7)
    for i in range(tenants):
        r = httpx.post(f"{url}/admin/api/tenants", json={"name": f"load-{i}"}, headers=admin)
        r.raise_for_status()
        headers = {"Authorization": f"Bearer {r.json()['api_key']['secret']}"}
        base = []
        for _ in range(2):
            ids = [rng.randrange(10, VOCAB) for _ in range(CACHE_TOKENS)]
            r = httpx.post(
                f"{url}/v1/cache/create", json={"token_ids": ids}, headers=headers, timeout=600
            )
            if r.status_code != 201:
                raise SystemExit(f"base cache not created: {r.status_code} {r.text}")
            base.append(r.json()["id"])
        out.append({"headers": headers, "base": base})
    return out


async def _drive(
    url: str,
    tenants: list[dict[str, Any]],
    concurrency: int,
    duration_s: float,
    max_requests: int,
) -> dict[str, Any]:
    """The load itself: ``concurrency`` workers until the time or the request budget is spent."""
    lat: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    attach: Counter[str] = Counter()
    sent = 0
    deadline = time.monotonic() + duration_s
    ops, weights = list(MIX), list(MIX.values())

    async def worker(seed: int) -> None:
        nonlocal sent
        rng = random.Random(seed)
        own: list[tuple[int, str]] = []  # caches this worker created: (tenant index, id)
        limits = httpx.Limits(max_connections=2)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                ti = rng.randrange(len(tenants))
                t = tenants[ti]
                h = t["headers"]
                op = rng.choices(ops, weights)[0]
                mine = [cid for i, cid in own if i == ti]
                if op == "delete" and not mine:
                    op = "create"
                cid = rng.choice(t["base"] + mine)
                t0 = time.perf_counter()
                try:
                    if op == "attach":
                        suffix = [rng.randrange(10, VOCAB) for _ in range(8)]
                        body = {"cache_id": cid, "token_ids": suffix, "max_tokens": 4}
                        r = await c.post("/v1/cache/attach", json=body, headers=h)
                        if r.status_code == 200:
                            attach["hit" if r.json()["cache"]["hit"] else "miss"] += 1
                    elif op == "get":
                        r = await c.get(f"/v1/caches/{cid}", headers=h)
                    elif op == "list":
                        r = await c.get("/v1/caches", params={"limit": 20}, headers=h)
                    elif op == "usage":
                        r = await c.get("/v1/usage", headers=h)
                    elif op == "create":
                        ids = [rng.randrange(10, VOCAB) for _ in range(CACHE_TOKENS)]
                        r = await c.post("/v1/cache/create", json={"token_ids": ids}, headers=h)
                        if r.status_code == 201:
                            own.append((ti, r.json()["id"]))
                    else:
                        victim = mine[0]
                        own.remove((ti, victim))
                        r = await c.delete(f"/v1/caches/{victim}", headers=h)
                    status = str(r.status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                lat[op].append((time.perf_counter() - t0) * 1e3)
                outcomes[f"{op} {status}"] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.monotonic() - t0
    per_op = {}
    for op in ops:
        xs = lat.get(op, [])
        if len(xs) >= 2:
            q = statistics.quantiles(xs, n=100, method="inclusive")
            per_op[op] = {
                "n": len(xs),
                "rps": round(len(xs) / elapsed, 2),
                "p50_ms": round(q[49], 1),
                "p99_ms": round(q[98], 1),
            }
    hits = attach["hit"]
    return {
        "elapsed_s": round(elapsed, 1),
        "requests": sum(outcomes.values()),
        "rps": round(sum(outcomes.values()) / elapsed, 2),
        "per_op": per_op,
        "outcomes": dict(sorted(outcomes.items())),
        "attach_hit_rate": round(hits / max(1, hits + attach["miss"]), 4),
    }


def _load_process(url: str, tenants: list[dict[str, Any]], args: tuple[Any, ...], out: Any) -> None:
    out.put(asyncio.run(_drive(url, tenants, *args)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvaas-load-") as tmp:
        log = args.log or Path(tmp) / "gateway.log"
        with gateway(Path(tmp) / "data", args.database_url, args.redis_url, log) as (url, proc):
            tenants = _setup(url, args.tenants)
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            drive = (args.concurrency, args.duration, args.max_requests)
            loader = ctx.Process(target=_load_process, args=(url, tenants, drive, out))
            with MemorySampler(proc.pid) as mem:
                loader.start()
                res = out.get(True, args.duration + 900)
                loader.join(60)
    res["memory"] = {
        "samples": mem.samples,
        "gateway": mem.growth("gateway_mib"),
        "engine": mem.growth("engine_mib"),
    }
    res["errors_5xx"] = sum(v for k, v in res["outcomes"].items() if k.split()[-1][0] == "5")
    res["transport_errors"] = sum(
        v for k, v in res["outcomes"].items() if not k.split()[-1].isdigit()
    )
    res["config"] = {
        "model": "tiny",
        "engine": "inprocess (CPU)",
        "database": "postgresql" if args.database_url else "sqlite (embedded)",
        "redis": bool(args.redis_url),
        "tenants": args.tenants,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "max_requests": args.max_requests,
        "mix_percent": MIX,
        "cpus": os.cpu_count(),
    }
    return res


def report(res: dict[str, Any]) -> None:
    c = res["config"]
    print(
        f"{c['tenants']} tenants, {c['concurrency']} workers, {res['elapsed_s']} s, "
        f"{res['requests']} requests ({res['rps']}/s); database {c['database']}, "
        f"redis {'on' if c['redis'] else 'off'}"
    )
    print(f"{'operation':<10} {'n':>6} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9}")
    for op, s in res["per_op"].items():
        print(f"{op:<10} {s['n']:>6} {s['rps']:>8.2f} {s['p50_ms']:>9.1f} {s['p99_ms']:>9.1f}")
    print(f"outcomes: {res['outcomes']}")
    print(f"5xx: {res['errors_5xx']}   transport errors: {res['transport_errors']}")
    print(f"attach store hit rate: {res['attach_hit_rate']:.1%}")
    for k in ("gateway", "engine"):
        g = res["memory"][k]
        print(
            f"{k} memory: {g['warm_mib']:.0f} MiB after warm-up, {g['end_mib']:.0f} MiB at the "
            f"end ({g['ratio']:.3f}x)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="30 s, 4 tenants, 8 workers")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--duration", type=float, help="seconds of load (default 300)")
    ap.add_argument("--tenants", type=int, help="tenants (default 16)")
    ap.add_argument("--concurrency", type=int, help="concurrent workers (default 24)")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="request budget")
    ap.add_argument("--database-url", help="KVAAS_DATABASE_URL for the gateway")
    ap.add_argument("--redis-url", help="KVAAS_REDIS_URL for the gateway")
    ap.add_argument("--log", type=Path, help="keep the gateway's log here")
    args = ap.parse_args()
    args.duration = args.duration or (30.0 if args.quick else 300.0)
    args.tenants = args.tenants or (4 if args.quick else 16)
    args.concurrency = args.concurrency or (8 if args.quick else 24)
    res = run(args)
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
