"""Time to first token through the HTTP API: attach and chat on a stored cache against the same
prompts without one, measured by the client, and the gateway's own share of an attach.

Two real ``kvaas serve`` processes run side by side on the embedded defaults (SQLite, the disk
tier, the in-process vLLM engine on the ``tiny`` model, one tenant each):

- ``store``: vLLM's own prefix cache **off**, so every request's cached tokens come from the
  KVaaS store (the engine worker's memory tier, the disk tier behind it): the case of a cache
  vLLM no longer holds. A ``cached_tokens`` equal to the cache's length proves the load;
- ``engine``: the prefix cache **on**, for vLLM's own hit through the same HTTP path.

Per prompt length (a cache of ``L`` random tokens, a request of 16 more) the configurations
are sampled round robin, one sample each per round in a shuffled order, after two untimed
warm-up rounds:

==================  ========  =============================================================
config              gateway   request (streamed, ``max_tokens`` 2; TTFT: the first token's
                              event, read by the client)
==================  ========  =============================================================
``cold``            store     ``/v1/completions``, ``L + 16`` fresh token ids
``vllm-prefix-hit`` engine    ``/v1/completions``, the same ``L + 16`` ids again
``attach``          store     ``/v1/cache/attach`` on the cache, 16 token ids
``chat-attach``     store     ``/v1/chat/completions`` with ``cache_id``, one user message
``attach-x8``       store     8 attaches at once (8 caches, not streamed, ``max_tokens`` 1)
``prefix-hit-x8``   engine    8 prefix hits at once (8 warmed prompts, likewise)
``get-cache``       store     ``GET /v1/caches/{id}`` of the cache: a request with auth and
                              a database read but no engine work (a floor for the overhead)
==================  ========  =============================================================

Derived rows: ``attach-engine``, the engine's own TTFT of each attach (``usage.ttft_ms``: from
the engine call to its first token, inside the gateway), and ``gateway-overhead``, the client's
TTFT minus that, per request (auth, the cache's lookup in SQLite and the store, the load plan,
the HTTP and server-sent-event framing, the client). The ``-x8`` rows report attached tokens
per second: the cached tokens of the 8 requests over the time until the last one answered.

Every attach sample must be a hit with all ``L`` tokens cached, every prefix-hit sample must
have at least ``L`` tokens cached and every cold one none; otherwise the bench stops.

    python bench/ttft_http.py [--quick] [--json PATH] [--rounds N] [--markdown JSON]

``--quick``: 1,024 tokens, 6 rounds (under a minute once the gateways are up). The client
(this process) and both gateways share the machine's cores; on a shared machine run it with
``nice -n -10`` (the gateways inherit it). The JSON's ``meta`` records the machine's load
averages before and after, the commit, and the files of ``kvaas/`` changed on top of it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _serve import Gateway, ServeError
from ttft import DASH, TIMES, quartiles, ratio_ci

ADMIN_TOKEN = "ttft-http-bench-admin-token-0123456789abcdef"
VOCAB = 4000  # token ids drawn below the tiny model's vocabulary (4,096)
QUERY = 16  # request tokens after the cache's
MAX_TOKENS = 2  # streamed: the first event carries the first token, the last the usage
CONCURRENCY = 8
STREAMED = ("cold", "vllm-prefix-hit", "attach", "chat-attach")
BATCHED = ("attach-x8", "prefix-hit-x8")
PLAIN = ("get-cache",)  # answered without the engine: latency only
MESSAGES = [{"role": "user", "content": "Name one colour."}]


class BenchError(RuntimeError):
    """A request failed or did not load what it had to: the numbers would mean nothing."""


def _env(data_dir: Path, prefix_caching: bool) -> dict[str, str]:
    return {
        "KVAAS_DATA_DIR": str(data_dir),
        "KVAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "KVAAS_MODEL": "tiny",
        "KVAAS_ENGINE": "inprocess",
        "KVAAS_ENGINE_KV_CACHE_GIB": "1",
        "KVAAS_ENGINE_PREFIX_CACHING": "true" if prefix_caching else "false",
        "KVAAS_RATE_LIMIT_PER_SECOND": "0",
        "KVAAS_TENANT_MAX_INFLIGHT": str(CONCURRENCY),
        "KVAAS_TENANT_MAX_INFLIGHT_SHARED": str(CONCURRENCY),
        "KVAAS_LOG_LEVEL": "warning",
    }


def _tenant(url: str) -> dict[str, str]:
    """A new tenant's API key as request headers."""
    r = httpx.post(
        f"{url}/admin/api/tenants",
        json={"name": "ttft-http"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['api_key']['secret']}"}


def _check(r: httpx.Response) -> None:
    if r.status_code >= 300:
        r.read()
        raise BenchError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}")


def _stream(c: httpx.Client, path: str, body: dict[str, Any]) -> tuple[float, list[Any]]:
    """Client TTFT in ms (until the first event carrying a token) and all the events."""
    events: list[Any] = []
    first: float | None = None
    t0 = time.perf_counter()
    with c.stream("POST", path, json={**body, "stream": True}) as r:
        _check(r)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise BenchError(f"{path}: {ev['error']}")
            opening = any("role" in ch.get("delta", {}) for ch in ev.get("choices", []))
            if first is None and ev.get("choices") and not opening:
                first = time.perf_counter()
            events.append(ev)
    if first is None:
        raise BenchError(f"{path}: no token streamed: {events}")
    return (first - t0) * 1e3, events


def _last(events: list[Any], key: str) -> Any:
    """``key`` of the last event that has it."""
    for ev in reversed(events):
        if ev.get(key) is not None:
            return ev[key]
    raise BenchError(f"no event carried {key!r}: {events}")


class Lane:
    """One gateway, one tenant, a kept-alive client per thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.headers = _tenant(url)
        self._local = threading.local()

    def client(self) -> httpx.Client:
        c: httpx.Client | None = getattr(self._local, "c", None)
        if c is None:
            c = httpx.Client(base_url=self.url, headers=self.headers, timeout=600)
            self._local.c = c
        return c


class Length:
    """The caches and prompts of one prompt length ``n`` on the two gateways."""

    def __init__(self, n: int, store: Lane, engine: Lane, rng: random.Random) -> None:
        self.n, self.store, self.engine, self.rng = n, store, engine, rng
        #: the threads of the ``-x8`` rows (their clients stay connected between batches)
        self.pool = cf.ThreadPoolExecutor(CONCURRENCY)
        self.query = self.ids(QUERY)
        self.cache = self._create()
        self.prompt = self.ids(n) + self.query
        self.caches = [self._create() for _ in range(CONCURRENCY)]
        self.prompts = [self.ids(n + QUERY) for _ in range(CONCURRENCY)]
        for p in [self.prompt, *self.prompts]:  # into vLLM's own prefix cache
            self._complete(engine, p, 1)

    def ids(self, k: int) -> list[int]:
        return [self.rng.randrange(10, VOCAB) for _ in range(k)]

    def _create(self) -> str:
        r = self.store.client().post("/v1/cache/create", json={"token_ids": self.ids(self.n)})
        _check(r)
        body = r.json()
        if body["stored_tokens"] != self.n:
            raise BenchError(f"a cache of {self.n} tokens stored {body['stored_tokens']}")
        return str(body["id"])

    def _complete(self, lane: Lane, ids: list[int], max_tokens: int) -> int:
        """A completion, not streamed: its cached prompt tokens."""
        body = {"model": "tiny", "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0}
        r = lane.client().post("/v1/completions", json=body)
        _check(r)
        return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    def _attach(self, cache_id: str) -> int:
        body = {"cache_id": cache_id, "token_ids": self.query, "max_tokens": 1}
        r = self.store.client().post("/v1/cache/attach", json=body)
        _check(r)
        res = r.json()
        self._loaded(res["cache"], res["usage"]["cached_tokens"])
        return int(res["usage"]["cached_tokens"])

    def _loaded(self, cache: dict[str, Any] | None, cached: int) -> None:
        if not cache or not cache["hit"] or cached != self.n:
            raise BenchError(f"attach did not load {self.n} tokens: {cache}, cached {cached}")

    def sample(self, config: str) -> dict[str, float]:
        """One sample of ``config`` (see the module's table)."""
        c = self.store.client()
        opts = {"max_tokens": MAX_TOKENS, "temperature": 0.0}
        usage = {"stream_options": {"include_usage": True}}
        if config == "cold":
            body = {"model": "tiny", "prompt": self.ids(self.n + QUERY), **opts, **usage}
            ttft, ev = _stream(c, "/v1/completions", body)
            cached = _last(ev, "usage")["prompt_tokens_details"]["cached_tokens"]
            if cached:
                raise BenchError(f"a cold prompt had {cached} cached tokens")
            return {"ms": ttft, "cached": cached}
        if config == "vllm-prefix-hit":
            body = {"model": "tiny", "prompt": self.prompt, **opts, **usage}
            ttft, ev = _stream(self.engine.client(), "/v1/completions", body)
            cached = _last(ev, "usage")["prompt_tokens_details"]["cached_tokens"]
            if cached < self.n:
                raise BenchError(f"a repeated prompt had {cached} of {self.n} tokens cached")
            return {"ms": ttft, "cached": cached}
        if config == "attach":
            body = {"cache_id": self.cache, "token_ids": self.query, **opts}
            ttft, ev = _stream(c, "/v1/cache/attach", body)
            u = _last(ev, "usage")
            self._loaded(_last(ev, "cache"), u["cached_tokens"])
            return {"ms": ttft, "engine_ms": u["ttft_ms"], "cached": u["cached_tokens"]}
        if config == "chat-attach":
            body = {"model": "tiny", "messages": MESSAGES, "cache_id": self.cache, **opts, **usage}
            ttft, ev = _stream(c, "/v1/chat/completions", body)
            cached = _last(ev, "usage")["prompt_tokens_details"]["cached_tokens"]
            self._loaded(_last(ev, "cache"), cached)
            return {"ms": ttft, "cached": cached}
        if config == "get-cache":
            t0 = time.perf_counter()
            r = c.get(f"/v1/caches/{self.cache}")
            _check(r)
            return {"ms": (time.perf_counter() - t0) * 1e3, "cached": 0}
        return self._batch(config)

    def _batch(self, config: str) -> dict[str, float]:
        """``CONCURRENCY`` requests at once: attached tokens per second until the last answer."""
        if config == "attach-x8":
            jobs = [lambda cid=cid: self._attach(cid) for cid in self.caches]
        else:
            jobs = [lambda p=p: self._complete(self.engine, p, 1) for p in self.prompts]
        t0 = time.perf_counter()
        cached = sum(f.result() for f in [self.pool.submit(j) for j in jobs])
        wall = time.perf_counter() - t0
        if config == "prefix-hit-x8" and cached < CONCURRENCY * self.n:
            raise BenchError(f"8 repeated prompts had {cached} tokens cached")
        return {"ms": wall * 1e3, "cached": cached, "tok_s": cached / wall}


def _machine() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def _source() -> dict[str, Any]:
    """The commit the gateways ran and the files of ``kvaas/`` changed on top of it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.rstrip()

    changed = git("status", "--porcelain", "--", "kvaas").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "kvaas_uncommitted": changed}


def run(lengths: list[int], rounds: int, tmp: Path, seed: int = 7) -> dict[str, Any]:
    """Start both gateways, sample every configuration ``rounds`` times per length."""
    store = Gateway(_env(tmp / "store", False), tmp / "store.log", ready_timeout_s=900)
    engine = Gateway(_env(tmp / "engine", True), tmp / "engine.log", ready_timeout_s=900)
    samples: dict[str, list[dict[str, float]]] = {}
    with store, engine:
        store.launch(), engine.launch()
        store.wait_ready(), engine.wait_ready()
        rng = random.Random(seed)
        s_lane, e_lane = Lane(store.url), Lane(engine.url)
        configs = [*STREAMED, *BATCHED, *PLAIN]
        for n in lengths:
            t0 = time.monotonic()
            length = Length(n, s_lane, e_lane, rng)
            for r in range(-2, rounds):  # two warm-up rounds
                order = configs[:]
                rng.shuffle(order)
                for config in order:
                    got = length.sample(config)
                    if r >= 0:
                        samples.setdefault(f"{config}/{n}", []).append(got)
            length.pool.shutdown()
            print(f"{n} tokens: {rounds} rounds in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return samples


def _q(xs: list[float], digits: int = 2) -> dict[str, float]:
    p25, p50, p75 = quartiles(xs)
    return {"p25": round(p25, digits), "p50": round(p50, digits), "p75": round(p75, digits)}


def summarize(samples: dict[str, list[dict[str, float]]], lengths: list[int]) -> list[Any]:
    """One row per (tokens, config) plus the derived ``attach-engine`` and ``gateway-overhead``
    rows: quartiles; TTFT rows with their ratio of medians to the prefix hit (bootstrap 95 %
    interval) and their speed-up over cold; ``-x8`` rows in attached tokens per second."""
    rows: list[dict[str, Any]] = []
    for n in lengths:
        ms = {c: [s["ms"] for s in samples[f"{c}/{n}"]] for c in STREAMED}
        att = samples[f"attach/{n}"]
        ms["attach-engine"] = [s["engine_ms"] for s in att]
        overhead = [s["ms"] - s["engine_ms"] for s in att]
        hit, cold = ms["vllm-prefix-hit"], statistics.median(ms["cold"])
        for config, xs in ms.items():
            r, lo, hi = ratio_ci(xs, hit)
            q = _q(xs)
            cached = [s["cached"] for s in samples.get(f"{config}/{n}", att)]
            rows.append(
                {
                    "tokens": n,
                    "config": config,
                    "unit": "ms",
                    "n": len(xs),
                    **q,
                    "cached_tokens": min(cached),
                    "vs_prefix_hit": round(r, 3),
                    "vs_prefix_hit_ci95": [round(lo, 3), round(hi, 3)],
                    "speedup_vs_cold": round(cold / q["p50"], 2),
                    "samples": [round(x, 2) for x in xs],
                }
            )
        plain = {"gateway-overhead": overhead}
        plain |= {c: [s["ms"] for s in samples[f"{c}/{n}"]] for c in PLAIN}
        for config, xs in plain.items():
            rows.append(
                {
                    "tokens": n,
                    "config": config,
                    "unit": "ms",
                    "n": len(xs),
                    **_q(xs),
                    "samples": [round(x, 2) for x in xs],
                }
            )
        tps = {c: [s["tok_s"] for s in samples[f"{c}/{n}"]] for c in BATCHED}
        for config, xs in tps.items():
            r, lo, hi = ratio_ci(xs, tps["prefix-hit-x8"])
            rows.append(
                {
                    "tokens": n,
                    "config": config,
                    "unit": "tokens/s",
                    "n": len(xs),
                    **_q(xs, 0),
                    "cached_tokens": min(s["cached"] for s in samples[f"{config}/{n}"]),
                    "vs_prefix_hit": round(r, 3),
                    "vs_prefix_hit_ci95": [round(lo, 3), round(hi, 3)],
                    "wall_ms_p50": round(
                        statistics.median(s["ms"] for s in samples[f"{config}/{n}"]), 2
                    ),
                    "samples": [round(x) for x in xs],
                }
            )
    return rows


LABELS = {
    "cold": "cold prefill (`/v1/completions`, no cache)",
    "vllm-prefix-hit": "vLLM prefix-cache hit (`/v1/completions`, repeated)",
    "attach": "`/v1/cache/attach` (client)",
    "attach-engine": "`/v1/cache/attach`, engine's own TTFT (`usage.ttft_ms`)",
    "chat-attach": "`/v1/chat/completions` with `cache_id`",
    "gateway-overhead": "gateway overhead: attach client TTFT minus engine TTFT",
    "get-cache": "`GET /v1/caches/{id}` (no engine work)",
    "attach-x8": "8 attaches at once",
    "prefix-hit-x8": "8 prefix-cache hits at once",
}


def _cells(r: dict[str, Any]) -> tuple[str, str, str]:
    unit = "tok/s" if r["unit"] == "tokens/s" else "ms"
    fmt = ".0f" if unit == "tok/s" else ".1f"
    mid = f"{r['p50']:{fmt}} ({r['p25']:{fmt}}{DASH}{r['p75']:{fmt}}) {unit}"
    ratio = ""
    if "vs_prefix_hit" in r:
        ci = r["vs_prefix_hit_ci95"]
        ratio = f"{r['vs_prefix_hit']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    cold = f"{r['speedup_vs_cold']:.1f}" if r.get("speedup_vs_cold") else ""
    return mid, ratio, cold


def markdown(doc: dict[str, Any]) -> str:
    """The docs table of a ``--json`` file: one per length."""
    out = []
    for n in dict.fromkeys(r["tokens"] for r in doc["rows"]):
        out.append(f"**tiny, {n}-token cache + {QUERY} request tokens**\n")
        out.append(
            f"| config | p50 (p25{DASH}p75) | {TIMES} prefix hit [95 % CI] "
            f"| {TIMES} faster than cold |"
        )
        out.append("|---|---:|---:|---:|")
        for r in (r for r in doc["rows"] if r["tokens"] == n):
            mid, ratio, cold = _cells(r)
            out.append(f"| {LABELS[r['config']]} | {mid} | {ratio} | {cold} |")
        out.append("")
    return "\n".join(out)


def print_table(doc: dict[str, Any]) -> None:
    print(
        f"{'tokens':>6}  {'config':<18} {'n':>4}  {'p50 (p25-p75)':<28} "
        f"{'x hit [95% CI]':<20} x cold"
    )
    for r in doc["rows"]:
        mid, ratio, cold = _cells(r)
        print(f"{r['tokens']:>6}  {r['config']:<18} {r['n']:>4}  {mid:<28} {ratio:<20} {cold}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,024 tokens, 6 rounds")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--rounds", type=int, help="rounds per length (default 30; quick 6)")
    ap.add_argument("--markdown", type=Path, help="print the docs table of a --json file")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    lengths = [1024] if args.quick else [1024, 2048]
    rounds = args.rounds or (6 if args.quick else 30)
    t0, load_before, source = time.monotonic(), os.getloadavg(), _source()
    with tempfile.TemporaryDirectory(prefix="kvaas-ttft-http-") as tmp:
        try:
            samples = run(lengths, rounds, Path(tmp))
        except (ServeError, BenchError) as e:
            print(f"ttft_http: {e}", file=sys.stderr)
            return 1
    doc = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "model": "tiny",
            **source,
            "gateways": "kvaas serve x2 (embedded SQLite, disk tier, in-process engine, CPU)",
            "machine": _machine(),
            "lengths": lengths,
            "rounds": rounds,
            "query_tokens": QUERY,
            "max_tokens": MAX_TOKENS,
            "concurrency": CONCURRENCY,
            "wall_s": round(time.monotonic() - t0, 1),
            # the machine's 1/5/15-minute load averages before and after: how busy it was
            "loadavg_start": [round(x, 2) for x in load_before],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "rows": summarize(samples, lengths),
    }
    print_table(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
