"""Fairness between tenants: a quiet tenant's attach latency, alone and beside a noisy one.

Runs the gateway in this process (the ``tiny`` model on the in-process engine, the embedded
SQLite database and local tiers, the default rate limit), served by uvicorn on 127.0.0.1, with
two tenants, each a client in a process of its own (as remote clients would be):

- ``quiet`` attaches its 1k-token cache, one request after the other (``--attaches`` times per
  phase), each attach timed;
- ``noisy`` runs ``10 x`` its in-flight limit (``KVAAS_TENANT_MAX_INFLIGHT``) of concurrent
  workers, each looping over a create of a new 1k-token cache, an attach of it and a completion
  without a cache.

Phases: ``baseline`` (quiet alone), ``at_limit`` (quiet beside a noisy tenant exactly at its
limit: as many workers as its in-flight cap), ``noisy`` (beside ``10 x`` that many), and
``huge_bodies`` (the noisy workers send multi-MB prompts instead, refused by their character
count, by the request schema or the prompt policy, before any tokenizing). Each phase reports
the quiet tenant's attach p50/p99 and its ratio to the baseline (the target: p99 ratio <=
1.5), and what the noisy tenant got back, by status and error type (429 ``engine_busy``: its
excess).

    python bench/fairness.py [--quick] [--json PATH] [--tenant-inflight N] [--markdown JSON]

The engine, the gateway and both clients share this machine's cores: on a small CPU-only
machine the engine's own compute is shared too, which a GPU's batching mostly hides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "bench-admin-token-0123456789-abcdef"
CACHE_TOKENS = 1024
HUGE_CHARS = 4 * 1024 * 1024  # a 4 MB prompt: refused by its length, never tokenized
#: the phases run beside the noisy tenant (``baseline`` always runs)
PHASES = frozenset({"at_limit", "noisy", "huge_bodies"})


def _corpus_text() -> str:
    """Real text to tokenize: the standard library's ``os`` modules."""
    return Path(os.__file__).read_text() + Path(os.path.__file__).read_text()


def _settings(data_dir: Path, tenant_inflight: int, engine: dict[str, Any]) -> Any:
    """The gateway's settings; ``engine``: the engine settings the command line chose."""
    from kvaas.config import Settings

    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        admin_token=ADMIN_TOKEN,
        engine="inprocess",
        model="tiny",
        memory_tier_bytes=256 * 1024 * 1024,
        chunk_tokens=256,
        engine_max_model_len=4096,
        engine_prefix_caching=False,
        engine_kv_cache_gib=2.0,
        tenant_max_inflight=tenant_inflight,
        **engine,
    )


async def _tenant(client: httpx.AsyncClient, name: str) -> dict[str, str]:
    r = await client.post(
        "/admin/api/tenants",
        json={"name": name},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['api_key']['secret']}"}


def _stats(ms: list[float], prefix: str = "") -> dict[str, Any]:
    """p50 and p99 of ``ms``, and every sample in the order taken (where the slow ones fall)."""
    q = statistics.quantiles(ms, n=100, method="inclusive")
    out: dict[str, Any] = {f"{prefix}p50_ms": round(q[49], 2), f"{prefix}p99_ms": round(q[98], 2)}
    out[f"{prefix}samples_ms"] = [round(x, 2) for x in ms]
    return out if prefix else {"n": len(ms), **out}


async def _quiet(
    client: httpx.AsyncClient, headers: dict[str, str], cache_id: str, suffix: list[int], n: int
) -> tuple[list[float], list[float]]:
    """``n`` sequential attaches: their wall times and the engine's time to first token (as
    the attach reports it), in ms."""
    out: list[float] = []
    out_engine: list[float] = []
    body = {"cache_id": cache_id, "token_ids": suffix, "max_tokens": 4, "temperature": 0.0}
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.post("/v1/cache/attach", json=body, headers=headers)
        out.append((time.perf_counter() - t0) * 1e3)
        r.raise_for_status()
        out_engine.append(float(r.json()["usage"]["ttft_ms"] or 0.0))
    return out, out_engine


def _quiet_process(
    url: str, quiet: tuple[dict[str, str], str, list[int]], n: int, out: Any
) -> None:
    """The quiet tenant as a client of its own (a process, as a remote client would be): its
    ``n`` attach times in ms, put on ``out``."""

    async def main() -> tuple[list[float], list[float]]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            # the client's own start (its connection, the key's first lookup) is not the
            # gateway's latency: one request that needs no engine before the attaches
            (await client.get("/v1/me", headers=quiet[0])).raise_for_status()
            return await _quiet(client, *quiet, n)

    out.put(asyncio.run(main()))


async def _quiet_elsewhere(
    url: str, quiet: tuple[dict[str, str], str, list[int]], n: int
) -> tuple[list[float], list[float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_quiet_process, args=(url, quiet, n, out))
    proc.start()
    try:
        wall, engine = await asyncio.to_thread(out.get, True, 3600)
        return list(wall), list(engine)
    finally:
        await asyncio.to_thread(proc.join, 60)


def _outcome(r: httpx.Response) -> str:
    if r.status_code < 400:
        return str(r.status_code)
    try:
        return f"{r.status_code} {r.json()['error']['type']}"
    except (ValueError, KeyError):
        return str(r.status_code)


async def _noisy_worker(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    corpus: list[int],
    seed: int,
    stop: asyncio.Event,
    seen: Counter[str],
) -> None:
    """Create a new cache, attach it, run a completion without a cache; again until stopped."""
    i = seed
    while not stop.is_set():
        start = (i * 97) % (len(corpus) - CACHE_TOKENS - 64)
        ids = corpus[start : start + CACHE_TOKENS]
        r = await client.post("/v1/cache/create", json={"token_ids": ids}, headers=headers)
        seen[f"create {_outcome(r)}"] += 1
        if r.status_code == 201:
            cid = r.json()["id"]
            r = await client.post(
                "/v1/cache/attach",
                json={"cache_id": cid, "token_ids": corpus[:16], "max_tokens": 16},
                headers=headers,
            )
            seen[f"attach {_outcome(r)}"] += 1
            await client.delete(f"/v1/caches/{cid}", headers=headers)  # stay within quotas
        r = await client.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": ids[:512], "max_tokens": 16},
            headers=headers,
        )
        seen[f"completion {_outcome(r)}"] += 1
        i += 1


async def _huge_worker(
    client: httpx.AsyncClient, headers: dict[str, str], stop: asyncio.Event, seen: Counter[str]
) -> None:
    """Multi-MB prompts to a completion and to a create, again until stopped. The gateway may
    refuse such a body by its length and close the connection before the client has sent it
    all: that counts as ``closed`` (the refusal, seen from the client)."""
    text = "lorem ipsum " * (HUGE_CHARS // 12)
    calls = (
        ("completion", "/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 16}),
        ("create", "/v1/cache/create", {"prompt": text}),
    )
    while not stop.is_set():
        for name, path, body in calls:
            try:
                r = await client.post(path, json=body, headers=headers)
                seen[f"{name} {_outcome(r)}"] += 1
            except httpx.TransportError:
                seen[f"{name} closed"] += 1


def _load_process(
    url: str,
    headers: dict[str, str],
    corpus: list[int],
    kind: str,
    width: int,
    stop: Any,
    out: Any,
) -> None:
    """The noisy tenant: ``width`` concurrent workers of ``kind`` until ``stop`` is set; puts
    what it got back (outcome -> count, and the CPU seconds this process used) on ``out``.

    It runs at the lowest CPU priority (nice 19): a real tenant's load is generated on its own
    machines, so the cost of *making* its requests (encoding multi-MB JSON bodies, a thousand
    refused requests a second) must not be taken from the service's cores here; serving them
    is still the gateway's work, measured."""
    os.nice(19)

    async def main() -> Counter[str]:
        seen: Counter[str] = Counter()
        done = asyncio.Event()
        limits = httpx.Limits(max_connections=width + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

            async def watch() -> None:
                await asyncio.to_thread(stop.wait)
                done.set()

            def worker(i: int) -> Any:
                if kind == "huge":
                    return _huge_worker(client, headers, done, seen)
                return _noisy_worker(client, headers, corpus, i, done, seen)

            await asyncio.gather(watch(), *(worker(i) for i in range(width)))
        return seen

    seen = dict(asyncio.run(main()))
    cpu = os.times()
    seen["client cpu seconds"] = round(cpu.user + cpu.system)
    out.put(seen)


@contextlib.asynccontextmanager
async def _noisy(
    url: str, headers: dict[str, str], corpus: list[int], kind: str, width: int
) -> AsyncIterator[Counter[str]]:
    """The noisy tenant's load in a process of its own for the block; the counter it yields is
    filled with what the tenant got back once the block ends."""
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(url, headers, corpus, kind, width, stop, out))
    proc.start()
    seen: Counter[str] = Counter()
    try:
        yield seen
    finally:
        stop.set()  # its requests in flight still need this loop to be answered
        seen.update(await asyncio.to_thread(out.get, True, 600))
        await asyncio.to_thread(proc.join, 60)


class _CpuUse:
    """CPU seconds per second of the quiet tenant's attaches, from its construction to
    :meth:`used`: of this process (the gateway, with the engine's front end) and of the
    engine's processes (this process's children alive at both ends: the clients are not)."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self._t0 = time.monotonic()
        self._gw0 = sum(self._me.cpu_times()[:2])
        self._kids0 = self._children()

    def _children(self) -> dict[int, float]:
        import psutil

        seen: dict[int, float] = {}
        for child in self._me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                seen[child.pid] = sum(child.cpu_times()[:2])
        return seen

    def used(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        kids = self._children()
        engine = sum(kids[p] - t for p, t in self._kids0.items() if p in kids)
        gateway = sum(self._me.cpu_times()[:2]) - self._gw0
        return {"gateway_cpu": round(gateway / wall, 3), "engine_cpu": round(engine / wall, 3)}


async def _phase(
    name: str,
    url: str,
    quiet: tuple[dict[str, str], str, list[int]],
    n: int,
    noisy: tuple[str, dict[str, str], list[int], str, int] | None,
) -> dict[str, Any]:
    """The quiet tenant's ``n`` attaches, alone or while the noisy load runs."""
    if noisy is None:
        cpu = _CpuUse()
        ms, engine_ms = await _quiet_elsewhere(url, quiet, n)
        return {"phase": name, **_stats(ms), **_stats(engine_ms, "engine_ttft_"), **cpu.used()}
    async with _noisy(*noisy) as seen:
        await asyncio.sleep(5.0)  # let the noisy load start and reach its steady state
        cpu = _CpuUse()
        ms, engine_ms = await _quiet_elsewhere(url, quiet, n)
        used = cpu.used()
    client_cpu = seen.pop("client cpu seconds", None)
    return {
        "phase": name,
        **_stats(ms),
        **_stats(engine_ms, "engine_ttft_"),
        **used,
        "noisy": dict(sorted(seen.items())),
        "noisy_429": sum(v for k, v in seen.items() if " 429" in k),
        "noisy_client_cpu_s": client_cpu,
    }


@contextlib.asynccontextmanager
async def _served(app: Any) -> AsyncIterator[str]:
    """``app`` served by uvicorn on a free port of 127.0.0.1, in this event loop."""
    import uvicorn

    from kvaas.api.http_protocol import http_protocol

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", access_log=False, http=http_protocol()
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(3000):
            if server.started:
                break
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def run(
    n: int, tenant_inflight: int, engine: dict[str, Any], only: frozenset[str] = PHASES
) -> dict[str, Any]:
    from kvaas.app import create_app

    with tempfile.TemporaryDirectory(prefix="kvaas-fairness-") as tmp:
        settings = _settings(Path(tmp), tenant_inflight, engine)
        app = create_app(settings)
        async with (
            app.router.lifespan_context(app),
            _served(app) as url,
            httpx.AsyncClient(base_url=url, timeout=600) as client,
        ):
            corpus = app.state.engine.model.encode(_corpus_text())
            quiet_h = await _tenant(client, "quiet")
            noisy_h = await _tenant(client, "noisy")
            r = await client.post(
                "/v1/cache/create", json={"token_ids": corpus[:CACHE_TOKENS]}, headers=quiet_h
            )
            r.raise_for_status()
            quiet = (quiet_h, r.json()["id"], corpus[CACHE_TOKENS : CACHE_TOKENS + 16])
            await _quiet(client, *quiet, 5)  # warm up
            width = 10 * tenant_inflight
            plan = {
                "at_limit": (url, noisy_h, corpus, "noisy", tenant_inflight),
                "noisy": (url, noisy_h, corpus, "noisy", width),
                "huge_bodies": (url, noisy_h, corpus, "huge", width),
            }
            phases = [await _phase("baseline", url, quiet, n, None)]
            for name, load in plan.items():
                if name in only:
                    phases.append(await _phase(name, url, quiet, n, load))
    base = phases[0]
    for p in phases[1:]:
        p["p50_ratio"] = round(p["p50_ms"] / base["p50_ms"], 3)
        p["p99_ratio"] = round(p["p99_ms"] / base["p99_ms"], 3)
    return {
        "config": {
            "model": "tiny",
            "engine": "inprocess (CPU)",
            "cache_tokens": CACHE_TOKENS,
            "attaches_per_phase": n,
            "engine_max_inflight": settings.engine_max_inflight,
            "tenant_max_inflight": tenant_inflight,
            **{
                k: getattr(settings, k)
                for k in (
                    "engine_max_batched_tokens",
                    "engine_prefill_chunk_tokens",
                    "engine_bulk_step_tokens",
                    "engine_bulk_max_hold_seconds",
                )
            },
            "tenant_max_queued": settings.tenant_max_queued,
            "database": settings.database_url.split(":", 1)[0].split("+", 1)[0]
            if settings.database_url
            else "sqlite (embedded)",
            "noisy_workers": 10 * tenant_inflight,
            "huge_prompt_chars": HUGE_CHARS,
            "cpus": os.cpu_count(),
        },
        "phases": phases,
        "target_p99_ratio": 1.5,
    }


def report(res: dict[str, Any]) -> None:
    c = res["config"]
    print(
        f"quiet tenant: sequential attaches of a {c['cache_tokens']}-token cache; noisy tenant: "
        f"{c['noisy_workers']} workers (10 x its in-flight limit {c['tenant_max_inflight']})"
    )
    print(
        f"{'phase':<12} {'n':>4} {'p50 ms':>9} {'p99 ms':>9} {'p50 x':>7} {'p99 x':>7} "
        f"{'engine TTFT p50/p99 ms':>23} {'CPU gw/engine':>14}  noisy 429s"
    )
    for p in res["phases"]:
        engine = f"{p['engine_ttft_p50_ms']:.1f} / {p['engine_ttft_p99_ms']:.1f}"
        cpu = f"{p['gateway_cpu']:.2f} / {p['engine_cpu']:.2f}" if "gateway_cpu" in p else "-"
        print(
            f"{p['phase']:<12} {p['n']:>4} {p['p50_ms']:>9.1f} {p['p99_ms']:>9.1f} "
            f"{p.get('p50_ratio', 1.0):>7.2f} {p.get('p99_ratio', 1.0):>7.2f} {engine:>23} "
            f"{cpu:>14}  "
            f"{p.get('noisy_429', '-')}"
        )
    for p in res["phases"][1:]:
        print(f"  {p['phase']}: noisy tenant got {p['noisy']}")


_PHASE_LABELS = {
    "baseline": "alone",
    "at_limit": "beside a tenant at its limit",
    "noisy": "beside a tenant at 10x its limit",
    "huge_bodies": "beside 4 MB prompts at 10x",
}


def _got(p: dict[str, Any]) -> str:
    """What the noisy tenant got back, in words."""
    seen: dict[str, int] = p.get("noisy") or {}
    served = sum(v for k, v in seen.items() if k.split()[1].startswith("2"))
    parts = [f"{served:,} served"] if served else []
    for kind in ("engine_busy", "rate_limit_error"):
        n = sum(v for k, v in seen.items() if k.endswith(f"429 {kind}"))
        if n:
            parts.append(f"{n:,} x 429 {kind}")
    refused = sum(v for k, v in seen.items() if not k.split()[1].startswith(("2", "429")))
    if refused:
        parts.append(f"{refused:,} refused by size")
    return ", ".join(parts)


def markdown(res: dict[str, Any]) -> str:
    """The docs table of a ``--json`` file."""
    out = [
        "| phase | quiet p50 ms | quiet p99 ms | p50 ratio | p99 ratio "
        "| engine TTFT p50 / p99 ms | CPU gateway / engine | noisy tenant got |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in res["phases"]:
        cpu = f"{p['gateway_cpu']:.2f} / {p['engine_cpu']:.2f}" if "gateway_cpu" in p else ""
        out.append(
            f"| {_PHASE_LABELS.get(p['phase'], p['phase'])} | {p['p50_ms']:.1f} "
            f"| {p['p99_ms']:.1f} | {p.get('p50_ratio', 1.0):.2f} | {p.get('p99_ratio', 1.0):.2f} "
            f"| {p['engine_ttft_p50_ms']:.1f} / {p['engine_ttft_p99_ms']:.1f} | {cpu} "
            f"| {_got(p)} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few attaches (under a minute)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--attaches", type=int, help="quiet attaches per phase")
    ap.add_argument("--tenant-inflight", type=int, default=4, help="per-tenant in-flight cap")
    ap.add_argument(
        "--max-batched-tokens",
        type=int,
        default=2048,
        help="tokens the engine computes per step (KVAAS_ENGINE_MAX_BATCHED_TOKENS)",
    )
    ap.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=0,
        help="per-request prompt tokens per engine step beside others "
        "(KVAAS_ENGINE_PREFILL_CHUNK_TOKENS; 0: no cap)",
    )
    ap.add_argument(
        "--bulk-step-tokens",
        type=int,
        default=None,
        help="tokens per engine step while another tenant's bulk prefill may run "
        "(KVAAS_ENGINE_BULK_STEP_TOKENS; 0: no cap; default: the setting's)",
    )
    ap.add_argument(
        "--bulk-step-ms",
        type=float,
        default=None,
        help="milliseconds such a step may take at the engine's measured speed "
        "(KVAAS_ENGINE_BULK_STEP_MS; 0: the token cap alone; default: the setting's)",
    )
    ap.add_argument(
        "--bulk-max-hold",
        type=float,
        default=None,
        help="longest hold of bulk prefill beside a lone request "
        "(KVAAS_ENGINE_BULK_MAX_HOLD_SECONDS; 0: no holding; default: the setting's)",
    )
    ap.add_argument(
        "--database-url",
        default=None,
        help="the gateway's database (KVAAS_DATABASE_URL; default: the embedded SQLite file)",
    )
    ap.add_argument(
        "--auth-cache-seconds",
        type=float,
        default=None,
        help="how long the gateway remembers a key that authenticated "
        "(KVAAS_AUTH_CACHE_SECONDS; 0: look every request up; default: the setting's)",
    )
    ap.add_argument(
        "--phases",
        default=",".join(sorted(PHASES)),
        help=f"comma-separated phases to run beside the baseline (of {', '.join(sorted(PHASES))})",
    )
    ap.add_argument("--markdown", type=Path, help="print the docs table of a --json file")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    only = frozenset(p for p in args.phases.split(",") if p)
    if only - PHASES:
        ap.error(f"unknown phases: {', '.join(sorted(only - PHASES))}")
    n = args.attaches or (20 if args.quick else 200)
    engine: dict[str, Any] = {
        "engine_max_batched_tokens": args.max_batched_tokens,
        "engine_prefill_chunk_tokens": args.prefill_chunk_tokens,
    }
    if args.bulk_step_tokens is not None:
        engine["engine_bulk_step_tokens"] = args.bulk_step_tokens
    if args.bulk_step_ms is not None:
        engine["engine_bulk_step_ms"] = args.bulk_step_ms
    if args.bulk_max_hold is not None:
        engine["engine_bulk_max_hold_seconds"] = args.bulk_max_hold
    if args.auth_cache_seconds is not None:
        engine["auth_cache_seconds"] = args.auth_cache_seconds
    if args.database_url is not None:
        engine["database_url"] = args.database_url
    res = asyncio.run(run(n, args.tenant_inflight, engine, only))
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
