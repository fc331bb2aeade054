"""Scale-out: a conversation trace replayed against a pool of 2 ``vllm serve`` nodes with
cache-aware routing and with cache-blind routing (round-robin, least-loaded), side by side in
one run.

**Pool.** Two nodes on the ``tiny`` model, started by
:func:`kvaas.engine.node_command.serve_command`
(the command ``kvaas engine command`` prints), each with the KVaaS connector, a private memory
tier of ``--memory-fraction`` of the trace's working set (so one node cannot hold every
session, two can between them) and a shared Redis (a throw-away ``redis-server`` of the bench's
own). vLLM's own prefix cache is off, so every reuse goes through the connector: the memory
tier is what routing can win. Each node's engine runs one thread (``OMP_NUM_THREADS=1``: the
two nodes share a 2-core machine).

**Trace.** Shaped like the public Mooncake traces (``conversation_trace.jsonl`` of
``kvcache-ai/Mooncake``, FAST'25 release: one record per request with ``timestamp`` in ms,
``input_length``, ``output_length`` and ``hash_ids``, one id per 512-token block, requests
sharing leading ids sharing a prefix; the conversation trace holds 12,031 requests over one
hour, 3.3 requests/s), generated with the same structure, scaled to a tiny model on a CPU:

- ``groups`` shared prefixes (a system prompt or document) of 2 chunks (512 tokens) each; every
  session starts with its group's prefix (groups picked Zipf-like, s = 1: a few are hot);
- each session adds 1 to 3 chunks of its own (uniform), then runs ``--turns`` turns (geometric,
  mean 4); a session's first request saves its context (a create), every later one attaches it
  with new tokens (lognormal, median 48, sigma 0.6, at most 200) and generates a lognormal
  number of tokens (median 8, sigma 0.8, at most 32; ``ignore_eos``);
- session starts are a Poisson process modulated on/off (bursty: in every 30 s, 10 s at twice
  the mean session rate ``--rate``, 20 s at half of it); turns of a session follow each other after
  an exponential think time (mean 2 s) once the previous turn is answered.

Every policy replays the same trace shape under fresh chunk keys (its own namespace), so no
phase reads what an earlier one stored.

**Measures.** Attach TTFT: time to the first streamed token of each attach, client side. The
memory-tier hit rate is counted at the shared tier: chunks the attaches needed minus the chunks
Redis served (its ``total_net_output_bytes`` over the phase divided by the chunk size, computed
by :func:`kvaas.codec.sizing.chunk_size`), over the chunks needed; the shared-tier bytes per
attach come from the same count. Route reasons are the router's.

    python bench/scaleout.py [--quick] [--json PATH] [--policies cache_aware,round_robin]

``--quick``: 6 sessions of 3 attaches on average, cache-aware and round-robin only (node
start-up, one to three minutes on a 2-core machine, comes on top). The meta also records Redis
memory per stored chunk (``used_memory`` growth over the chunks the phases stored, index entries
included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # when loaded by its path
from _serve import free_port, start_redis

CHUNK = 256
PREFIX_CHUNKS = 2


# --------------------------------------------------------------------------- processes
@dataclass
class LocalNode:
    """One ``vllm serve`` node of a local pool, in its own process group."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL the node and everything it started (engine core, workers)."""
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_pool(
    model_dir: Path,
    store: dict[str, Any],
    n: int,
    logdir: Path,
    *,
    limit_s: float = 600,
) -> list[LocalNode]:
    """Start ``n`` nodes on ``model_dir`` with ``store`` (``StoreConfig.to_dict()``) by the
    printed node command, all at once, and wait until each answers ``/health``."""
    from kvaas.codec.sizing import kv_dtype
    from kvaas.engine.node_command import serve_command
    from kvaas.engine.options import EngineOptions

    nodes = []
    for i in range(n):
        port = free_port()
        cmd = serve_command(
            str(model_dir),
            "tiny",
            store,
            port=port,
            options=EngineOptions(
                dtype=kv_dtype(model_dir, "auto"),
                max_model_len=4096,
                max_num_batched_tokens=2048,
                prefix_caching=False,
                kv_cache_gib=0.5,
            ),
        )
        env = {**os.environ, **cmd.env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env.pop("VLLM_API_KEY", None)
        log = logdir / f"node{i}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *cmd.argv[1:]],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        nodes.append(LocalNode(f"http://127.0.0.1:{port}", proc, log))
    deadline = time.monotonic() + limit_s
    try:
        for node in nodes:
            while True:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"a node exited:\n{node.log.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{node.url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"a node did not start:\n{node.log.read_text()[-3000:]}")
                time.sleep(1)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


# --------------------------------------------------------------------------- trace
@dataclass
class Session:
    start_s: float
    group: int
    own_chunks: int
    turns: list[tuple[float, int, int]]  # (think time s, new tokens, output tokens)


def tokens(rng: random.Random, n: int) -> list[int]:
    """``n`` random token ids (the tiny model's vocabulary holds them)."""
    return [rng.randrange(100, 4000) for _ in range(n)]


def lognormal(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(1, min(cap, round(median * math.exp(rng.gauss(0.0, sigma)))))


def make_trace(
    rng: random.Random, sessions: int, groups: int, rate: float, turns: float = 4.0
) -> list[Session]:
    """Sessions with Mooncake-like structure (see the module docstring)."""
    weights = [1.0 / (g + 1) for g in range(groups)]  # Zipf, s = 1
    out: list[Session] = []
    t = 0.0
    for _ in range(sessions):
        burst = (t % 30.0) < 10.0  # 10 s of every 30 s at 2x the mean rate, then 0.5x
        t += rng.expovariate(rate * (2.0 if burst else 0.5))
        steps = [(0.0, 0, 0)]  # the create
        n = 1 + min(int(rng.expovariate(1 / max(turns - 1.0, 0.1))), 12)  # mean about turns
        for _ in range(n):
            steps.append(
                (
                    rng.expovariate(1 / 2.0),
                    lognormal(rng, 48, 0.6, 200),
                    lognormal(rng, 8, 0.8, 32),
                )
            )
        g = rng.choices(range(groups), weights)[0]
        out.append(Session(t, g, rng.randint(1, 3), steps))
    return out


def working_set_chunks(trace: list[Session], groups: int) -> int:
    return groups * PREFIX_CHUNKS + sum(s.own_chunks for s in trace)


# --------------------------------------------------------------------------- replay
@dataclass
class Phase:
    policy: str
    ttft_ms: list[float] = field(default_factory=list)
    create_ms: list[float] = field(default_factory=list)
    chunks_needed: int = 0
    errors: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    per_node: Counter[str] = field(default_factory=Counter)
    redis_bytes: int = 0
    wall_s: float = 0.0


async def _complete(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[float, bool]:
    """Stream one completion: (ms to the first token, ok)."""
    t0 = time.perf_counter()
    first: float | None = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return (time.perf_counter() - t0) * 1e3, False
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    return ((first or time.perf_counter()) - t0) * 1e3, True


async def replay(
    policy: str,
    trace: list[Session],
    urls: list[str],
    seed: int,
    groups: int,
    fingerprint: str,
) -> Phase:
    """Replay ``trace`` with ``policy`` routing (fresh keys: namespace from ``seed``)."""
    from kvaas.connector.params import TransferPlan
    from kvaas.engine.remote import Node
    from kvaas.engine.routing import Router
    from kvaas.store.crypto import TenantKeys
    from kvaas.store.keys import chunk_keys, derive_namespace

    rng = random.Random(seed)
    ns = derive_namespace(rng.randbytes(32))
    seal = TenantKeys("k1", {"k1": rng.randbytes(32)})
    router = Router(policy)  # type: ignore[arg-type]
    nodes = [Node(u) for u in urls]
    phase = Phase(policy)
    prefixes = [tokens(rng, PREFIX_CHUNKS * CHUNK) for _ in range(groups)]

    def plan(op: str, ctx: list[int]) -> tuple[TransferPlan, list[bytes]]:
        keys = chunk_keys(ctx, namespace=ns, model_fingerprint=fingerprint, scheme_id="int4")
        p = TransferPlan(op, tuple(keys), CHUNK, "int4", fingerprint=fingerprint, seal=seal)  # type: ignore[arg-type]
        return p, [bytes(k) for k in keys]

    async def send(
        client: httpx.AsyncClient,
        tokens: list[int],
        p: TransferPlan,
        keys: list[bytes],
        max_tokens: int,
    ) -> tuple[float, bool]:
        while True:
            d = router.choose(nodes, time.monotonic(), keys=keys)
            assert d is not None
            if d.url is not None:
                break
            await asyncio.sleep(0.005)
        node = next(n for n in nodes if n.url == d.url)
        phase.reasons[d.reason] += 1
        phase.per_node[node.url] += 1
        node.inflight += 1
        try:
            body = {
                "model": "tiny",
                "prompt": tokens,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "kv_transfer_params": p.to_params(),
            }
            ms, ok = await _complete(client, node.url, body)
        except httpx.HTTPError:
            ms, ok = 0.0, False
        finally:
            node.inflight -= 1
        if ok:
            router.record(keys, node.url, time.monotonic())
        return ms, ok

    async def session(
        client: httpx.AsyncClient, s: Session, t0: float, srng: random.Random
    ) -> None:
        await asyncio.sleep(max(0.0, t0 + s.start_s - time.monotonic()))
        ctx = prefixes[s.group] + tokens(srng, s.own_chunks * CHUNK)
        p, keys = plan("save", ctx)
        ms, ok = await send(client, [*ctx, 1000], p, keys, 1)
        if not ok:
            phase.errors += 1
            return
        phase.create_ms.append(ms)
        p, keys = plan("load", ctx)
        for think, new, out in s.turns[1:]:
            await asyncio.sleep(think)
            prompt = ctx + tokens(srng, new)
            ms, ok = await send(client, prompt, p, keys, out)
            if ok:
                phase.ttft_ms.append(ms)
                phase.chunks_needed += len(keys)
            else:
                phase.errors += 1

    async with httpx.AsyncClient(timeout=300) as client:
        t0 = time.monotonic()
        await asyncio.gather(
            *(session(client, s, t0, random.Random(seed * 1000 + i)) for i, s in enumerate(trace))
        )
        phase.wall_s = time.monotonic() - t0
    return phase


# --------------------------------------------------------------------------- report
def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summarize(phase: Phase, chunk_bytes: int) -> dict[str, Any]:
    """One row: hit rate, TTFT quantiles, shared-tier bytes per attach, route reasons."""
    from_redis = phase.redis_bytes / chunk_bytes
    needed = max(phase.chunks_needed, 1)
    attaches = len(phase.ttft_ms)
    return {
        "policy": phase.policy,
        "attaches": attaches,
        "creates": len(phase.create_ms),
        "errors": phase.errors,
        "memory_hit_rate": round(max(0.0, 1.0 - from_redis / needed), 4),
        "chunks_needed": phase.chunks_needed,
        "chunks_from_redis": round(from_redis, 1),
        "redis_bytes_per_attach": round(phase.redis_bytes / max(attaches, 1)),
        "ttft_p50_ms": round(statistics.median(phase.ttft_ms), 2) if phase.ttft_ms else None,
        "ttft_p99_ms": round(_pct(phase.ttft_ms, 0.99), 2),
        "create_p50_ms": round(statistics.median(phase.create_ms), 2) if phase.create_ms else None,
        "reasons": dict(phase.reasons),
        "per_node": sorted(phase.per_node.values(), reverse=True),
        "wall_s": round(phase.wall_s, 1),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'policy':<12} {'attaches':>8} {'mem hit':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'redis KB/attach':>15} {'errors':>6}  routes"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['policy']:<12} {r['attaches']:>8} {r['memory_hit_rate']:>8.1%} "
            f"{r['ttft_p50_ms']:>8.1f} {r['ttft_p99_ms']:>8.1f} "
            f"{r['redis_bytes_per_attach'] / 1024:>15.1f} {r['errors']:>6}  {r['reasons']}"
        )


async def warm_up(urls: list[str], rounds: int = 3) -> None:
    """A few plain requests on every node first: a fresh node's first forward passes are
    slow, and the first policy replayed must not pay for them."""
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=300) as client:
        for _ in range(rounds):
            for url in urls:
                body = {"model": "tiny", "prompt": tokens(rng, 700), "max_tokens": 8}
                body |= {"temperature": 0.0, "ignore_eos": True, "stream": True}
                await _complete(client, url, body)


def _redis_out_bytes(url: str) -> int:
    import redis

    return int(redis.Redis.from_url(url).info("stats")["total_net_output_bytes"])


def _redis_used_bytes(url: str) -> int:
    import redis

    return int(redis.Redis.from_url(url).info("memory")["used_memory"])


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 sessions, about 15 s per policy")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--sessions", type=int, help="sessions per policy (default 24; quick 6)")
    ap.add_argument("--turns", type=float, help="mean attaches per session (default 4; quick 3)")
    ap.add_argument("--groups", type=int, default=4, help="shared prefixes")
    ap.add_argument("--rate", type=float, help="mean session starts per second (default 0.6)")
    ap.add_argument(
        "--memory-fraction",
        type=float,
        default=0.6,
        help="each node's memory tier, as a share of the trace's working set",
    )
    ap.add_argument("--policies", help="default cache_aware,round_robin,least_loaded (quick: 2)")
    ap.add_argument("--seed", type=int, default=16)
    args = ap.parse_args()
    sessions = args.sessions or (6 if args.quick else 24)
    turns = args.turns or (3.0 if args.quick else 4.0)
    rate = args.rate or (0.6 if not args.quick else 0.8)
    default = "cache_aware,round_robin" + ("" if args.quick else ",least_loaded")
    policies = [p for p in (args.policies or default).split(",") if p]

    from kvaas.codec.sizing import chunk_size, kv_dtype, read_kv_shape
    from kvaas.engine.model_info import model_fingerprint
    from kvaas.model_presets import resolve_model
    from kvaas.store.factory import StoreConfig

    data = Path(tempfile.gettempdir()) / "kvaas-bench"
    model_dir = resolve_model("tiny", data)
    dtype = kv_dtype(model_dir, "auto")
    chunk_bytes = chunk_size(read_kv_shape(model_dir, dtype), CHUNK, "int4").expected
    fingerprint = model_fingerprint(model_dir, dtype)
    trace = make_trace(random.Random(args.seed), sessions, args.groups, rate, turns)
    ws = working_set_chunks(trace, args.groups)
    memory_bytes = int(ws * chunk_bytes * args.memory_fraction)
    redis_url, redis_proc, redis_dir = start_redis("kvaas-scaleout-redis-")
    logdir = Path(tempfile.mkdtemp(prefix="kvaas-scaleout-"))
    store = StoreConfig(
        memory_bytes=memory_bytes,
        disk_dir=None,
        disk_bytes=0,
        redis_url=redis_url,
        redis_prefix="scaleout",
    ).to_dict()
    t_start = time.perf_counter()
    nodes: list[LocalNode] = []
    rows = []
    try:
        nodes = start_pool(model_dir, store, 2, logdir)
        start_s = time.perf_counter() - t_start
        print(
            f"2 nodes up in {start_s:.0f} s; working set {ws} chunks of {chunk_bytes} B, "
            f"memory tier {memory_bytes / 2**20:.1f} MiB per node",
            flush=True,
        )
        urls = [n.url for n in nodes]
        asyncio.run(warm_up(urls))
        used0 = _redis_used_bytes(redis_url)
        for i, policy in enumerate(policies):
            before = _redis_out_bytes(redis_url)
            phase = asyncio.run(
                replay(policy, trace, urls, args.seed * 100 + i, args.groups, fingerprint)
            )
            phase.redis_bytes = _redis_out_bytes(redis_url) - before
            rows.append(summarize(phase, chunk_bytes))
            print(f"  {policy}: {rows[-1]}", flush=True)
        redis_per_chunk = (_redis_used_bytes(redis_url) - used0) / max(ws * len(policies), 1)
    finally:
        for n in nodes:
            n.kill()
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(redis_dir, ignore_errors=True)
    print()
    print_table(rows)
    by = {r["policy"]: r for r in rows}
    ca, rr = by.get("cache_aware"), by.get("round_robin")
    if ca and rr and rr["memory_hit_rate"] > 0:
        print(
            f"\nhit rate cache_aware / round_robin: "
            f"{ca['memory_hit_rate'] / rr['memory_hit_rate']:.2f}x"
        )
    doc = {
        "meta": {
            "model": "tiny",
            "nodes": 2,
            "chunk_tokens": CHUNK,
            "scheme": "int4",
            "chunk_bytes": chunk_bytes,
            "sessions": sessions,
            "groups": args.groups,
            "rate_sessions_per_s": rate,
            "working_set_chunks": ws,
            "memory_tier_bytes_per_node": memory_bytes,
            "node_start_s": round(start_s, 1),
            "redis_bytes_per_stored_chunk": round(redis_per_chunk),
            "turns_mean": turns,
            "quick": args.quick,
            "seed": args.seed,
            "cpus": os.cpu_count(),
        },
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
