"""Fairness between tenants: a quiet tenant's attach latency, alone and beside a noisy one.

Runs the gateway in this process (the ``tiny`` model on the in-process engine, the embedded
SQLite database and local tiers, the default rate limit), served by uvicorn on 127.0.0.1, with
two tenants, each a client in a process of its own (as remote clients would be):

- ``quiet`` attaches its 1k-token cache, one request after the other, each attach timed;
- ``noisy`` runs concurrent workers, each looping over a create of a new 1k-token cache, an
  attach of it and a completion without a cache.

Phases: ``at_limit`` (beside a noisy tenant exactly at its limit: as many workers as its
in-flight cap ``KVAAS_TENANT_MAX_INFLIGHT``), ``noisy`` (beside ``10 x`` that many) and
``huge_bodies`` (the ``10 x`` workers send multi-MB prompts instead, refused by their character
count, by the request schema or the prompt policy, before any tokenizing). In each phase the
quiet tenant's attaches alternate in blocks (``--block``): a block alone (the noisy tenant
switched off and its requests answered), then a block beside it (switched on again), so the
machine's drift moves both sides alike and each ratio compares samples taken side by side.
Each phase reports the quiet tenant's attach p50/p99 alone and beside, their ratios with a
bootstrap 95 % interval (the target: p99 ratio <= 1.5), and what the noisy tenant got back, by
status and error type (429 ``engine_busy``: its excess).

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
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "bench-admin-token-0123456789-abcdef"
CACHE_TOKENS = 1024
#: tokens between the starts of two noisy prompts (every start gives other chunk contents)
PROMPT_SHIFT = 7
HUGE_CHARS = 4 * 1024 * 1024  # a 4 MB prompt: refused by its length, never tokenized
#: the phases run beside the noisy tenant
PHASES = frozenset({"at_limit", "noisy", "huge_bodies"})
#: after the noisy tenant stops sending and its requests are answered, before an alone block
SETTLE_S = 0.5
#: after it starts sending again, before a block beside it (its queue full again)
RAMP_S = 1.5


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


def _q99(ms: Any) -> float:
    return float(np.percentile(ms, 99))


def _stats(ms: list[float], prefix: str = "") -> dict[str, Any]:
    """p50 and p99 of ``ms``, and every sample in the order taken (where the slow ones fall)."""
    out: dict[str, Any] = {
        f"{prefix}p50_ms": round(float(np.percentile(ms, 50)), 2),
        f"{prefix}p99_ms": round(_q99(ms), 2),
        f"{prefix}samples_ms": [round(x, 2) for x in ms],
    }
    return out


def _ratio_ci(alone: list[float], beside: list[float], q: float, rounds: int = 2000) -> list[float]:
    """95 % bootstrap interval of ``percentile(beside, q) / percentile(alone, q)``."""
    rng = np.random.default_rng(7)
    a, b = np.asarray(alone), np.asarray(beside)
    ia = rng.integers(0, len(a), (rounds, len(a)))
    ib = rng.integers(0, len(b), (rounds, len(b)))
    ratios = np.percentile(b[ib], q, axis=1) / np.percentile(a[ia], q, axis=1)
    return [round(float(x), 3) for x in np.percentile(ratios, [2.5, 97.5])]


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
    url: str, quiet: tuple[dict[str, str], str, list[int]], orders: Any, out: Any
) -> None:
    """The quiet tenant as a client of its own (a process, as a remote client would be): for
    each ``n`` read from ``orders`` (``None``: stop), ``n`` attaches, their times put on
    ``out``."""

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            # the client's own start (its connection, the key's first lookup) is not the
            # gateway's latency: one request that needs no engine before the attaches
            (await client.get("/v1/me", headers=quiet[0])).raise_for_status()
            while (n := await asyncio.to_thread(orders.get)) is not None:
                out.put(await _quiet(client, *quiet, n))

    asyncio.run(main())


class _QuietClient:
    """The quiet tenant's client process, asked for blocks of attaches."""

    def __init__(self, url: str, quiet: tuple[dict[str, str], str, list[int]]) -> None:
        ctx = mp.get_context("spawn")
        self._orders, self._out = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_quiet_process, args=(url, quiet, self._orders, self._out))
        self._proc.start()

    async def attaches(self, n: int) -> tuple[list[float], list[float]]:
        self._orders.put(n)
        wall, engine = await asyncio.to_thread(self._out.get, True, 3600)
        return list(wall), list(engine)

    async def close(self) -> None:
        self._orders.put(None)
        await asyncio.to_thread(self._proc.join, 60)


def _outcome(r: httpx.Response) -> str:
    if r.status_code < 400:
        return str(r.status_code)
    try:
        return f"{r.status_code} {r.json()['error']['type']}"
    except (ValueError, KeyError):
        return str(r.status_code)


class _Pace:
    """The noisy workers' switch and their requests in flight, shared with the bench: a worker
    sends only while ``go`` is set."""

    def __init__(self, go: Any, inflight: Any, stop: asyncio.Event) -> None:
        self.go, self.inflight, self.stop = go, inflight, stop

    async def ready(self) -> bool:
        """Wait until the workers may send; ``False`` once stopped."""
        # ``go`` is another process's switch: polled (an asyncio event cannot cross processes)
        while not self.go.is_set() and not self.stop.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return not self.stop.is_set()

    @contextlib.contextmanager
    def sending(self) -> Any:
        with self.inflight.get_lock():
            self.inflight.value += 1
        try:
            yield
        finally:
            with self.inflight.get_lock():
                self.inflight.value -= 1


async def _noisy_worker(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    corpus: list[int],
    seed: int,
    stride: int,
    pace: _Pace,
    seen: Counter[str],
) -> None:
    """Create a new cache, attach it, run a completion without a cache; again until stopped.
    A request whose connection the gateway closed (an idle keep-alive connection it had just
    timed out) counts as ``closed``, and the worker goes on."""

    async def post(name: str, path: str, body: dict[str, Any]) -> httpx.Response | None:
        try:
            with pace.sending():
                r = await client.post(path, json=body, headers=headers)
        except httpx.TransportError:
            seen[f"{name} closed"] += 1
            return None
        seen[f"{name} {_outcome(r)}"] += 1
        return r

    i = seed
    while await pace.ready():
        # a prompt of its own: worker ``seed`` takes every ``stride``-th start, so no two
        # workers (and no two rounds, within the corpus) create the same cache contents
        start = (i * PROMPT_SHIFT) % (len(corpus) - CACHE_TOKENS - 64)
        ids = corpus[start : start + CACHE_TOKENS]
        r = await post("create", "/v1/cache/create", {"token_ids": ids})
        if r is not None and r.status_code == 201:
            cid = r.json()["id"]
            body = {"cache_id": cid, "token_ids": corpus[:16], "max_tokens": 16}
            await post("attach", "/v1/cache/attach", body)
            with contextlib.suppress(httpx.TransportError), pace.sending():
                await client.delete(f"/v1/caches/{cid}", headers=headers)  # within quotas
        if not await pace.ready():
            return
        body = {"model": "tiny", "prompt": ids[:512], "max_tokens": 16}
        await post("completion", "/v1/completions", body)
        i += stride


async def _huge_worker(
    client: httpx.AsyncClient, headers: dict[str, str], pace: _Pace, seen: Counter[str]
) -> None:
    """Multi-MB prompts to a completion and to a create, again until stopped. The gateway may
    refuse such a body by its length and close the connection before the client has sent it
    all: that counts as ``closed`` (the refusal, seen from the client)."""
    text = "lorem ipsum " * (HUGE_CHARS // 12)
    calls = (
        ("completion", "/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 16}),
        ("create", "/v1/cache/create", {"prompt": text}),
    )
    while await pace.ready():
        for name, path, body in calls:
            try:
                with pace.sending():
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
    switches: tuple[Any, Any, Any],
    out: Any,
) -> None:
    """The noisy tenant: ``width`` concurrent workers of ``kind``, sending while ``go`` is set,
    until ``stop`` is set (``switches``: ``go``, ``stop``, the shared count of its requests in
    flight); puts what it got back (outcome -> count, and the CPU seconds this process used)
    on ``out``.

    It runs at the lowest CPU priority (nice 19): a real tenant's load is generated on its own
    machines, so the cost of *making* its requests (encoding multi-MB JSON bodies, a thousand
    refused requests a second) must not be taken from the service's cores here; serving them
    is still the gateway's work, measured."""
    os.nice(19)
    go, stop, inflight = switches

    async def main() -> Counter[str]:
        seen: Counter[str] = Counter()
        done = asyncio.Event()
        pace = _Pace(go, inflight, done)
        limits = httpx.Limits(max_connections=width + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

            async def watch() -> None:
                await asyncio.to_thread(stop.wait)
                done.set()

            def worker(i: int) -> Any:
                if kind == "huge":
                    return _huge_worker(client, headers, pace, seen)
                return _noisy_worker(client, headers, corpus, i, width, pace, seen)

            await asyncio.gather(watch(), *(worker(i) for i in range(width)))
        return seen

    seen = dict(asyncio.run(main()))
    cpu = os.times()
    seen["client cpu seconds"] = round(cpu.user + cpu.system)
    out.put(seen)


class _Noisy:
    """The noisy tenant's load process, switched on and off between the quiet tenant's blocks."""

    def __init__(self, url: str, headers: dict[str, str], corpus: list[int], kind: str, width: int):
        ctx = mp.get_context("spawn")
        self.go, self._stop, self.inflight = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
        self._out = ctx.Queue()
        self._proc = ctx.Process(
            target=_load_process,
            args=(url, headers, corpus, kind, width, self._switches(), self._out),
        )
        self._proc.start()

    def _switches(self) -> tuple[Any, Any, Any]:
        return (self.go, self._stop, self.inflight)

    async def on(self, ramp_s: float) -> None:
        """Start sending; return once ``ramp_s`` has passed (its queue filled again)."""
        self.go.set()
        await asyncio.sleep(ramp_s)

    async def off(self, settle_s: float) -> None:
        """Stop sending; return once its requests in flight are answered, and ``settle_s``
        after that."""
        self.go.clear()
        while self.inflight.value > 0:  # noqa: ASYNC110 (a count in another process)
            await asyncio.sleep(0.02)
        await asyncio.sleep(settle_s)

    async def close(self) -> Counter[str]:
        """What it got back (and its CPU seconds)."""
        self._stop.set()  # its requests in flight still need this loop to be answered
        seen: Counter[str] = Counter(await asyncio.to_thread(self._out.get, True, 600))
        await asyncio.to_thread(self._proc.join, 60)
        return seen


class _CpuUse:
    """CPU seconds of this process (the gateway, with the engine's front end) and of the
    engine's processes (this process's children alive at both ends: the clients are not)
    between :meth:`start` and :meth:`stop`, summed over every such span."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self.wall = self.gateway = self.engine = 0.0

    def _children(self) -> dict[int, float]:
        import psutil

        seen: dict[int, float] = {}
        for child in self._me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                seen[child.pid] = sum(child.cpu_times()[:2])
        return seen

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._gw0 = sum(self._me.cpu_times()[:2])
        self._kids0 = self._children()

    def stop(self) -> None:
        kids = self._children()
        self.wall += time.monotonic() - self._t0
        self.engine += sum(kids[p] - t for p, t in self._kids0.items() if p in kids)
        self.gateway += sum(self._me.cpu_times()[:2]) - self._gw0

    def used(self) -> dict[str, float]:
        """CPU seconds per second of the spans measured."""
        w = self.wall or 1.0
        return {"gateway_cpu": round(self.gateway / w, 3), "engine_cpu": round(self.engine / w, 3)}


class _Side:
    """The quiet tenant's attaches on one side of a phase (alone, or beside the noisy tenant):
    their times and the CPU used while they ran, gathered block by block."""

    def __init__(self, quiet: _QuietClient) -> None:
        self.quiet = quiet
        self.wall: list[float] = []
        self.engine: list[float] = []
        self.cpu = _CpuUse()

    async def block(self, n: int) -> None:
        self.cpu.start()
        wall, engine = await self.quiet.attaches(n)
        self.cpu.stop()
        self.wall += wall
        self.engine += engine

    def stats(self) -> dict[str, Any]:
        return {**_stats(self.wall), **_stats(self.engine, "engine_ttft_"), **self.cpu.used()}


async def _phase(
    name: str,
    quiet: _QuietClient,
    n: int,
    block: int,
    noisy: tuple[str, dict[str, str], list[int], str, int],
) -> dict[str, Any]:
    """``n`` attaches of the quiet tenant alone and ``n`` beside the noisy load, in
    alternating blocks of ``block``: each loaded block right after an alone one, so a drift of
    the machine moves both alike."""
    alone, beside = _Side(quiet), _Side(quiet)
    load = _Noisy(*noisy)
    try:
        while len(beside.wall) < n:
            k = min(block, n - len(beside.wall))
            await load.off(SETTLE_S)
            await alone.block(k)
            await load.on(RAMP_S)
            await beside.block(k)
    finally:
        seen = await load.close()
    client_cpu = seen.pop("client cpu seconds", None)
    out: dict[str, Any] = {"phase": name, "n": len(beside.wall), "alone": alone.stats()}
    out.update(beside.stats())
    for q, key in ((50, "p50"), (99, "p99")):
        out[f"{key}_ratio"] = round(out[f"{key}_ms"] / out["alone"][f"{key}_ms"], 3)
        out[f"{key}_ratio_ci95"] = _ratio_ci(alone.wall, beside.wall, q)
    out["noisy"] = dict(sorted(seen.items()))
    out["noisy_429"] = sum(v for k, v in seen.items() if " 429" in k)
    out["noisy_client_cpu_s"] = client_cpu
    return out


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
    n: int,
    tenant_inflight: int,
    engine: dict[str, Any],
    only: frozenset[str] = PHASES,
    block: int = 20,
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
            client_q = _QuietClient(url, quiet)
            try:
                await client_q.attaches(5)  # its own warm-up
                phases = [
                    await _phase(name, client_q, n, block, load)
                    for name, load in plan.items()
                    if name in only
                ]
            finally:
                await client_q.close()
    return {
        "config": {
            "model": "tiny",
            "engine": "inprocess (CPU)",
            "cache_tokens": CACHE_TOKENS,
            "attaches_per_phase": n,
            "block": block,
            "settle_s": SETTLE_S,
            "ramp_s": RAMP_S,
            "engine_max_inflight": settings.engine_max_inflight,
            "tenant_max_inflight": tenant_inflight,
            **{
                k: getattr(settings, k)
                for k in (
                    "engine_max_batched_tokens",
                    "engine_prefill_chunk_tokens",
                    "engine_bulk_step_tokens",
                    "engine_bulk_step_ms",
                    "engine_bulk_max_hold_seconds",
                    "engine_interactive_grace_ms",
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
        f"quiet tenant: sequential attaches of a {c['cache_tokens']}-token cache, alone and "
        f"beside the noisy tenant in alternating blocks of {c['block']}; noisy tenant: "
        f"{c['noisy_workers']} workers at 10x (its in-flight limit {c['tenant_max_inflight']})"
    )
    print(
        f"{'phase':<12} {'n':>4} {'alone p50/p99':>15} {'beside p50/p99':>15} {'p50 x':>6} "
        f"{'p99 x [95% CI]':>20} {'TTFT alone/beside p50':>22} {'CPU gw/engine':>14}  noisy 429s"
    )
    for p in res["phases"]:
        a = p["alone"]
        ci = p["p99_ratio_ci95"]
        print(
            f"{p['phase']:<12} {p['n']:>4} {a['p50_ms']:>7.1f}/{a['p99_ms']:<7.1f} "
            f"{p['p50_ms']:>7.1f}/{p['p99_ms']:<7.1f} {p['p50_ratio']:>6.2f} "
            f"{p['p99_ratio']:>6.2f} [{ci[0]:.2f}, {ci[1]:.2f}] "
            f"{a['engine_ttft_p50_ms']:>10.1f}/{p['engine_ttft_p50_ms']:<11.1f} "
            f"{p['gateway_cpu']:>6.2f} / {p['engine_cpu']:<5.2f}  {p['noisy_429']}"
        )
    for p in res["phases"]:
        print(f"  {p['phase']}: noisy tenant got {p['noisy']}")


_PHASE_LABELS = {
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
        "| phase | alone p50 / p99 ms | beside p50 / p99 ms | p50 ratio | p99 ratio [95 % CI] "
        "| engine TTFT p50 ms, alone / beside | CPU gateway / engine, beside | noisy tenant got |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in res["phases"]:
        a, ci = p["alone"], p["p99_ratio_ci95"]
        out.append(
            f"| {_PHASE_LABELS.get(p['phase'], p['phase'])} "
            f"| {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | {p['p50_ms']:.1f} / {p['p99_ms']:.1f} "
            f"| {p['p50_ratio']:.2f} | {p['p99_ratio']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] "
            f"| {a['engine_ttft_p50_ms']:.1f} / {p['engine_ttft_p50_ms']:.1f} "
            f"| {p['gateway_cpu']:.2f} / {p['engine_cpu']:.2f} | {_got(p)} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="the noisy phase, few attaches (under a minute)"
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument(
        "--attaches",
        type=int,
        help="quiet attaches per phase beside the noisy tenant (as many alone)",
    )
    ap.add_argument(
        "--block", type=int, help="attaches per block (alone and beside alternate; default 20)"
    )
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
        "--grace-ms",
        type=float,
        default=None,
        help="how long bulk prefill stays held after a lone request ends "
        "(KVAAS_ENGINE_INTERACTIVE_GRACE_MS; 0: no grace; default: the setting's)",
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
        default=None,
        help=f"comma-separated phases to run (of {', '.join(sorted(PHASES))}; default: all, "
        "with --quick: noisy)",
    )
    ap.add_argument("--markdown", type=Path, help="print the docs table of a --json file")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    phases = args.phases or ("noisy" if args.quick else ",".join(sorted(PHASES)))
    only = frozenset(p for p in phases.split(",") if p)
    if only - PHASES:
        ap.error(f"unknown phases: {', '.join(sorted(only - PHASES))}")
    n = args.attaches or (20 if args.quick else 200)
    block = args.block or (10 if args.quick else 20)
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
    if args.grace_ms is not None:
        engine["engine_interactive_grace_ms"] = args.grace_ms
    if args.auth_cache_seconds is not None:
        engine["auth_cache_seconds"] = args.auth_cache_seconds
    if args.database_url is not None:
        engine["database_url"] = args.database_url
    res = asyncio.run(run(n, args.tenant_inflight, engine, only, block))
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
