"""Time to first token: attach from each KVaaS tier against vLLM's own prefix-cache hit, side by
side in ONE engine process.

For each model and prompt length, every configuration below is sampled in the same engine,
round robin (one sample of each configuration per round, in a shuffled order), so that slow
drifts of the machine hit all rows alike:

- ``vllm-prefix-hit``: the same prompt and ``cache_salt`` again (the no-transfer limit);
- ``cold``: a prompt the engine has never seen (a few rounds only: it is the slow reference);
- ``example-connector``: vLLM's ``ExampleConnector`` (uncompressed safetensors on disk) loading a
  prompt it stored;
- ``kvaas-<tier>-<scheme>[-plain]``: attach through the KVaaS connector with the chunks in the
  ``decoded`` tier (the worker's pre-decoded chunks: one copy each), the ``memory`` tier (the
  worker's in-process tier of stored blobs, decoded on load), ``redis`` or ``disk``; encrypted
  at rest (AES-GCM, as in production) or ``-plain`` (a store without encryption). Their plans
  are ``checked``, as the gateway's are (it looks the chunks up before it sends an attach; that
  lookup is timed by ``bench/ttft_http.py``), so the engine's scheduler asks the store nothing;
- ``kvaas-{redis,disk}-int4-lookup``: the same with an unchecked plan, which the scheduler looks
  up in the store itself (what the gateway's check saves the engine, side by side).

The engine has prefix caching on; each attach uses a fresh ``cache_salt`` and fresh chunk keys,
so the engine's own cache misses and the connector really loads. The engine runs vLLM's
``MultiConnector`` over three KVaaS stores (encrypted, plain: encryption is a property of a
store; and an encrypted one whose workers keep a pre-decoded tier, which the other two have
off) and ``ExampleConnector``; each request is routed to one of them
(``bench/ttft_connectors.py``).
Each prompt is prefilled and saved once (scheme ``none``); the bench process re-encodes it per
scheme and writes it under fresh keys into exactly the tier a sample reads from (``disk``: disk
only; ``redis``: Redis only; ``memory``: Redis, then one untimed attach promotes it into the
worker's memory tier; ``decoded``: likewise, and the background promotion after that load
fills the pre-decoded tier, which the timed attach must report it was served from). Every
attach sample checks that the engine reports the tokens loaded.

The engine core runs in the bench's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no
hand-off between processes in a TTFT) on one thread (``OMP_NUM_THREADS=1``) bound to core 0
(``KVAAS_BENCH_ENGINE_CORE``): on a shared 2-core machine an OpenMP pool over both cores stalls
at every barrier whenever another process holds one of them, which swamps the differences this
bench is after. Run it with ``nice -n -10``.

Rounds alternate ``idle`` and ``loaded``: in loaded rounds a busy-looping process runs on the
other core (resumed with SIGCONT, paused with SIGSTOP between rounds), where everything of an
attach that is not the engine's thread runs (the store's I/O threads, Redis, the page cache),
so the ratio under contention is sampled side by side too.

Reported per row: p25/p50/p75 TTFT, the ratio of medians to the prefix hit (and to the same
row unencrypted) with a bootstrap 95 % interval, and for attach rows the connector's own
per-stage times (median ms per stage from the ``load_ms`` of its report: scheduler lookup,
fetch per tier, verify, promote, the whole store call, decode, copy, the whole load) with
what they leave unexplained of the attach's TTFT over the prefix hit's. The ``memory`` rows'
timed attach follows the untimed one with the same keys; the ``-lookup`` rows always look up
fresh keys. The cost of opening a sealed chunk (AES-GCM) is timed per chunk in the bench
process and set against the attach time.

    python bench/ttft.py [--quick] [--json PATH] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _serve import start_redis

BENCH_DIR = Path(__file__).resolve().parent
CHUNK = 256
MAX_BATCHED = 2048  # the engine's batched-token limit: longer prompts prefill in steps
FINGERPRINT = "bench"
#: The core the engine's thread is bound to (the background load runs on the others).
ENGINE_CORE = int(os.environ.get("KVAAS_BENCH_ENGINE_CORE", "0"))
TIMES, DASH = "\u00d7", "\u2013"  # for the markdown tables


# --------------------------------------------------------------------------- statistics
def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """p25, p50, p75 (inclusive method)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def ratio_ci(num: list[float], den: list[float], n: int = 2000) -> tuple[float, float, float]:
    """Ratio of medians ``median(num) / median(den)`` and its bootstrap 95 % interval."""
    rng = random.Random(7)
    point = statistics.median(num) / statistics.median(den)
    boots = sorted(
        statistics.median(rng.choices(num, k=len(num)))
        / statistics.median(rng.choices(den, k=len(den)))
        for _ in range(n)
    )
    return point, boots[int(0.025 * n)], boots[int(0.975 * n) - 1]


# --------------------------------------------------------------------------- engine side
def _engine(model_dir: str, kv: dict[str, Any]) -> Any:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # the engine core runs in this process: a TTFT is the engine's own work, without the
    # hand-off between two processes that a busy 2-core machine makes noisy
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # the engine process imports the routed connectors from bench/
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH", "")) if p
    )
    sys.path.insert(0, str(BENCH_DIR))
    from vllm import LLM
    from vllm.config import KVTransferConfig

    return LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=4096,
        max_num_batched_tokens=MAX_BATCHED,
        enforce_eager=True,
        enable_prefix_caching=True,
        kv_transfer_config=KVTransferConfig(**kv),
        disable_log_stats=True,
    )


#: The KVaaS connector's report (``kv_transfer_params["kvaas"]``) of the last generation.
LAST_REPORT: dict[str, Any] = {}


def _gen(
    llm: Any, ids: list[int], salt: str, params: dict[str, Any] | None = None
) -> tuple[float, int]:
    """TTFT in ms (wall time of a one-token generation) and the prompt tokens not computed;
    the connector's report is left in :data:`LAST_REPORT`."""
    from vllm import SamplingParams

    extra = {"kv_transfer_params": params} if params else None
    sp = SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra)
    prompt = {"prompt_token_ids": ids, "cache_salt": salt}
    t0 = time.perf_counter()
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    ms = (time.perf_counter() - t0) * 1e3
    LAST_REPORT.clear()
    LAST_REPORT.update((out.kv_transfer_params or {}).get("kvaas") or {})
    return ms, int(out.num_cached_tokens or 0)


def _multi_config(roots: dict[str, Path], redis_url: str, memory_bytes: int) -> dict[str, Any]:
    from kvaas.connector import transfer_config

    def kvaas(route: str, encrypted: bool, decoded_bytes: int = 0) -> dict[str, Any]:
        store = _store_cfg(roots[route], redis_url, route, encrypted, memory_bytes)
        cfg = transfer_config(store, decoded_bytes=decoded_bytes)
        cfg["kv_connector"] = "RoutedKVaaSConnector"
        cfg["kv_connector_module_path"] = "ttft_connectors"
        cfg["kv_connector_extra_config"]["bench_route"] = route
        cfg.pop("kv_load_failure_policy", None)
        return cfg

    return {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "connectors": [
                kvaas("enc", True),
                kvaas("plain", False),
                kvaas("dec", True, decoded_bytes=memory_bytes),
                {
                    "kv_connector": "RoutedExampleConnector",
                    "kv_connector_module_path": "ttft_connectors",
                    "kv_role": "kv_both",
                    "kv_connector_extra_config": {
                        "shared_storage_path": str(roots["example"]),
                        "bench_route": "example",
                    },
                },
            ]
        },
    }


def _store_cfg(
    root: Path, redis_url: str, route: str, encrypted: bool, memory_bytes: int
) -> dict[str, Any]:
    from kvaas.store.factory import StoreConfig

    return StoreConfig(
        memory_bytes=memory_bytes,
        disk_dir=root / "chunks",
        disk_bytes=64 << 30,
        redis_url=redis_url,
        redis_prefix=f"bench-ttft-{os.getpid()}-{route}",
        encrypted=encrypted,
    ).to_dict()


class Burner:
    """A busy-looping process on the other core (not the engine's), paused unless a loaded
    round runs: it competes with everything of an attach that is not the engine's own thread
    (the store's I/O threads, Redis, the page cache)."""

    def __init__(self) -> None:
        spin = "import os\np = os.getppid()\nwhile os.getppid() == p: pass"  # ends with us
        self.proc = subprocess.Popen([sys.executable, "-c", spin])
        cores = os.sched_getaffinity(0) - {ENGINE_CORE}
        if cores:
            os.sched_setaffinity(self.proc.pid, cores)
        self.pause()

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        self.proc.kill()
        self.proc.wait()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run every configuration of one model in one engine; return raw samples."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its pool
    import torch

    from kvaas import codec
    from kvaas.connector import TransferPlan
    from kvaas.store.crypto import ChunkSealer, MasterKeys
    from kvaas.store.factory import StoreConfig
    from kvaas.store.keys import chunk_keys, derive_namespace
    from kvaas.store.sync import SyncTieredStore

    model_dir, lengths, vocab = spec["model_dir"], spec["lengths"], spec["vocab"]
    schemes, rounds, redis_url = spec["schemes"], spec["rounds"], spec["redis_url"]
    tiers = ("decoded", "memory", "redis", "disk")
    base = Path(tempfile.mkdtemp(prefix="kvaas-bench-ttft-"))
    roots = {r: base / r for r in ("enc", "plain", "dec", "example")}
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    llm = _engine(model_dir, _multi_config(roots, redis_url, spec["memory_bytes"]))
    engine_s = time.perf_counter() - t_start
    # the bench's own handles on the shared tiers (no memory tier), one per store
    stores = {
        r: SyncTieredStore.from_config(
            StoreConfig.from_dict(_store_cfg(roots[r], redis_url, r, r != "plain", 0))
        )
        for r in ("enc", "plain", "dec")
    }
    for s in stores.values():
        s.open()
    # the engine computes on this thread: bind it (threads started before, the stores' I/O,
    # stay free to run on any core)
    os.sched_setaffinity(0, {ENGINE_CORE})
    master = MasterKeys("k1", {"k1": os.urandom(32)})
    rng = random.Random(1234)

    def new_prompt(n: int) -> list[int]:
        return [1] + [rng.randrange(10, vocab) for _ in range(n - 1)]

    salt_n = iter(range(10**9))

    def fresh_salt() -> str:
        return f"s{os.getpid()}-{next(salt_n)}"

    def sealer_for(ns: bytes, scheme: str) -> ChunkSealer:
        return ChunkSealer(master.tenant_keys(ns), FINGERPRINT, scheme)

    _gen(llm, new_prompt(256), fresh_salt())  # warm-up
    samples: dict[str, list[float]] = {}
    stages: dict[str, list[dict[str, float]]] = {}  # per attach sample: the connector's ms
    info: dict[str, Any] = {"engine_start_s": round(engine_s, 1), "seal_open": {}}

    def one_length(n: int) -> None:
        """Every configuration at ``n`` tokens, round robin."""
        prompt = new_prompt(n)
        n_chunks = -(-n // CHUNK)  # the partial last chunk is stored too
        tail = n % CHUNK
        # save once, uncompressed (the containers are re-encoded per scheme below)
        ns0 = derive_namespace(os.urandom(32))
        keys0 = tuple(
            chunk_keys(
                prompt,
                namespace=ns0,
                model_fingerprint=FINGERPRINT,
                scheme_id="none",
                partial=True,
            )
        )
        save = TransferPlan(
            "save",
            keys0,
            CHUNK,
            "none",
            "cold",
            fingerprint=FINGERPRINT,
            seal=master.tenant_keys(ns0),
            tail=tail,
        )
        _gen(llm, prompt, fresh_salt(), {**save.to_params(), "bench_route": "enc"})
        raw = stores["enc"].get_prefix(list(keys0), sealer_for(ns0, "none"))
        if len(raw) != n_chunks:
            raise RuntimeError(f"saved {len(raw)} of {n_chunks} chunks")
        tensors = [codec.decode(b) for b in raw]
        blobs = {s: [codec.encode(t, s) for t in tensors] for s in schemes}
        # per-chunk AES-GCM open cost, timed here (one core, no engine running)
        for s in schemes:
            sk = sealer_for(ns0, s)
            sealed = [sk.seal(k, b) for k, b in zip(keys0, blobs[s], strict=True)]
            ts = []
            for _ in range(20):
                t0 = time.perf_counter()
                for k, b in zip(keys0, sealed, strict=True):
                    sk.open(k, b)
                ts.append((time.perf_counter() - t0) * 1e3)
            info["seal_open"][f"{s}/{n}"] = {
                "chunk_bytes": len(blobs[s][0]),
                "open_ms_per_attach": round(statistics.median(ts), 4),
                "chunks_per_attach": n_chunks,
            }
        hit_salt = fresh_salt()
        _gen(llm, prompt, hit_salt)  # the engine's prefix cache now holds it
        if n <= MAX_BATCHED:  # ExampleConnector saves it
            _gen(llm, prompt, fresh_salt(), {"bench_route": "example"})
        expect = _gen(llm, prompt, hit_salt)[1]  # tokens the engine's own hit reuses

        def attach(tier: str, scheme: str, route: str, checked: bool = True) -> float:
            ns = derive_namespace(os.urandom(32))
            keys = tuple(
                chunk_keys(
                    prompt,
                    namespace=ns,
                    model_fingerprint=FINGERPRINT,
                    scheme_id=scheme,
                    partial=True,
                )
            )
            enc = route != "plain"
            sk = sealer_for(ns, scheme) if enc else None
            items = list(zip(keys, blobs[scheme], strict=True))
            stores[route].put_chunks(items, "cold" if tier == "disk" else "hot", sk)
            plan = TransferPlan(
                "load",
                keys,
                CHUNK,
                scheme,
                fingerprint=FINGERPRINT,
                seal=master.tenant_keys(ns) if enc else None,
                tail=tail,
                checked=checked,
            )
            params = {**plan.to_params(), "bench_route": route}
            if tier in ("memory", "decoded"):  # an untimed attach promotes the chunks
                # into memory (the chunks stay in Redis too: the scheduler's lookup sees the
                # shared tiers only, the worker reads its memory tier first); the decoded
                # tier is filled by a background thread after that load: given a moment
                _gen(llm, prompt, fresh_salt(), params)
                if tier == "decoded":
                    time.sleep(0.05)
            ms, got = _gen(llm, prompt, fresh_salt(), params)
            if got < expect:  # every chunk is stored, the partial last one included
                raise RuntimeError(f"{tier}/{scheme}/{route}: loaded only {got} tokens")
            if tier == "decoded" and int(LAST_REPORT.get("decoded_tokens") or 0) < got:
                raise RuntimeError(f"decoded/{scheme}: not served from the decoded tier")
            store = stores[route].store
            for t in ("redis", "disk"):
                stores[route]._call(store.tier(t).delete_many, list(keys))
            return ms

        configs: list[tuple[str, Any]] = [
            ("vllm-prefix-hit", lambda: _gen(llm, prompt, hit_salt)[0]),
        ]
        if n <= MAX_BATCHED:  # ExampleConnector stores one step's tokens: no chunked prefill
            configs.append(
                (
                    "example-connector",
                    lambda: _gen(llm, prompt, fresh_salt(), {"bench_route": "example"})[0],
                )
            )
        for tier in tiers:
            for s in schemes:
                for route in ("dec",) if tier == "decoded" else ("enc", "plain"):
                    label = f"kvaas-{tier}-{s}" + ("-plain" if route == "plain" else "")
                    configs.append((label, lambda t=tier, s=s, r=route: attach(t, s, r)))
            if tier in ("redis", "disk") and "int4" in schemes:  # what the gateway's check saves
                configs.append(
                    (f"kvaas-{tier}-int4-lookup", lambda t=tier: attach(t, "int4", "enc", False))
                )
        for r in range(rounds):
            load = "loaded" if spec["loaded"] and r % 2 else "idle"
            order = list(configs)
            if r < spec["cold_rounds"]:
                order.append(("cold", lambda: _gen(llm, new_prompt(n), fresh_salt())[0]))
            rng.shuffle(order)
            if load == "loaded":
                burner.resume()
            for label, fn in order:
                samples.setdefault(f"{label}/{load}/{n}", []).append(fn())
                if label.startswith("kvaas-"):
                    stages.setdefault(f"{label}/{load}/{n}", []).append(
                        dict(LAST_REPORT.get("load_ms") or {})
                    )
            burner.pause()
            print(f"  {n} tokens: round {r + 1}/{rounds} ({load})", file=sys.stderr, flush=True)
        info[f"cached/{n}"] = expect

    burner = Burner()
    try:
        for n in lengths:
            one_length(n)
    finally:
        burner.close()
        for s in stores.values():
            s.close()
    return {"samples": samples, "stages": stages, "info": info}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one model's engine in its own process; results come back in a file (the engine's
    own output on stdout and stderr cannot corrupt them)."""
    with tempfile.TemporaryDirectory(prefix="kvaas-ttft-") as tmp:
        result = Path(tmp) / "result.json"
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps({**spec, "result": str(result)})],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        if out.returncode == 0 and result.exists():
            return dict(json.loads(result.read_text()))
    raise RuntimeError(f"engine failed:\n{out.stderr[-4000:]}")


# --------------------------------------------------------------------------- report
def summarize(
    model: str, results: dict[str, Any], lengths: list[int], bytes_per_token: int
) -> list[dict[str, Any]]:
    """One row per (tokens, load, config): quartiles and ratios with bootstrap intervals."""
    samples: dict[str, list[float]] = results["samples"]
    rows: list[dict[str, Any]] = []
    for n in lengths:
        for load in ("idle", "loaded"):
            hit = samples.get(f"vllm-prefix-hit/{load}/{n}")
            if not hit:
                continue
            cold = samples.get(f"cold/{load}/{n}") or samples.get(f"cold/idle/{n}")
            labels = sorted(k.split("/")[0] for k in samples if k.endswith(f"/{load}/{n}"))
            for label in labels:
                xs = samples[f"{label}/{load}/{n}"]
                p25, p50, p75 = quartiles(xs)
                r, lo, hi = ratio_ci(xs, hit)
                row: dict[str, Any] = {
                    "model": model,
                    "tokens": n,
                    "load": load,
                    "config": label,
                    "n": len(xs),
                    "p25_ms": round(p25, 2),
                    "ttft_ms": round(p50, 2),
                    "p75_ms": round(p75, 2),
                    "vs_prefix_hit": round(r, 3),
                    "vs_prefix_hit_ci95": [round(lo, 3), round(hi, 3)],
                    "speedup_vs_cold": round(statistics.median(cold) / p50, 2) if cold else None,
                }
                if label.startswith("kvaas-"):
                    extra_s = (p50 - statistics.median(hit)) / 1e3
                    cached = results["info"][f"cached/{n}"]
                    row["load_gbps"] = (
                        round(cached * bytes_per_token / extra_s / 1e9, 3) if extra_s > 0 else None
                    )
                    if not label.endswith("-plain"):
                        plain = samples.get(f"{label}-plain/{load}/{n}")
                        if plain:
                            e, elo, ehi = ratio_ci(xs, plain)
                            row["vs_unencrypted"] = round(e, 3)
                            row["vs_unencrypted_ci95"] = [round(elo, 3), round(ehi, 3)]
                        scheme = label.split("-")[2]
                        so = results["info"]["seal_open"].get(f"{scheme}/{n}")
                        if so:
                            row["open_ms_per_attach"] = so["open_ms_per_attach"]
                            row["open_share_of_attach"] = round(so["open_ms_per_attach"] / p50, 6)
                per = results.get("stages", {}).get(f"{label}/{load}/{n}")
                if per:
                    row.update(stage_columns(per, p50 - statistics.median(hit)))
                row["samples_ms"] = [round(x, 2) for x in xs]
                rows.append(row)
    return rows


def stage_columns(per_sample: list[dict[str, float]], extra_ms: float) -> dict[str, Any]:
    """The connector's per-stage times (median ms over the samples, per stage; see
    :mod:`kvaas.connector.timings`) and what they leave unexplained: the attach's median
    TTFT over the prefix hit's, less the scheduler's lookup and the worker's whole load."""
    keys = sorted({k for s in per_sample for k in s})
    med = {k: round(statistics.median([s.get(k, 0.0) for s in per_sample]), 3) for k in keys}
    out: dict[str, Any] = {"stage_ms": med}
    if "load" in med:
        out["unaccounted_ms"] = round(extra_ms - med["load"] - med.get("lookup", 0.0), 2)
    return out


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = (
        "model",
        "tokens",
        "load",
        "config",
        "p25",
        "p50 ms",
        "p75",
        "x hit [95% CI]",
        "x cold",
        "enc/plain [95% CI]",
    )
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        ci = r["vs_prefix_hit_ci95"]
        enc = ""
        if "vs_unencrypted" in r:
            e = r["vs_unencrypted_ci95"]
            enc = f"{r['vs_unencrypted']:.3f} [{e[0]:.3f}, {e[1]:.3f}]"
        table.add_row(
            r["model"],
            str(r["tokens"]),
            r["load"],
            r["config"],
            f"{r['p25_ms']:.1f}",
            f"{r['ttft_ms']:.1f}",
            f"{r['p75_ms']:.1f}",
            f"{r['vs_prefix_hit']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]",
            "" if r["speedup_vs_cold"] is None else f"{r['speedup_vs_cold']:.1f}",
            enc,
        )
    Console(width=170).print(table)
    staged = [r for r in rows if r.get("stage_ms")]
    if not staged:
        return
    st = Table(title="Where an attach's time goes: median ms per stage (connector's report)")
    for col in ("model", "tokens", "load", "config", *STAGES, "unaccounted"):
        st.add_column(col, justify="right", no_wrap=True)
    for r in staged:
        cells = _stage_cells(r["stage_ms"])
        st.add_row(
            r["model"],
            str(r["tokens"]),
            r["load"],
            r["config"],
            *cells,
            f"{r.get('unaccounted_ms', 0.0):.1f}",
        )
    Console(width=170).print(st)


def _label(config: str) -> str:
    if config == "cold":
        return "cold prefill"
    if config == "vllm-prefix-hit":
        return "vLLM prefix-cache hit (no transfer)"
    if config == "example-connector":
        return "vLLM `ExampleConnector` (disk, uncompressed)"
    _, tier, scheme, *rest = config.split("-")
    label = f"KVaaS {tier}, {scheme}" + (", plain" if "plain" in rest else ", encrypted")
    return label + (", unchecked plan" if "lookup" in rest else "")


def _scheme(config: str) -> str | None:
    parts = config.split("-")
    return parts[2] if config.startswith("kvaas-") else None


#: The connector's load stages, in the order a load runs them (:mod:`kvaas.connector.timings`).
STAGES = ("lookup", "decoded", "fetch", "verify", "promote", "store", "decode", "copy", "load")


def _stage_cells(ms: dict[str, float]) -> list[str]:
    """Median ms per stage; ``fetch`` is the sum over the tiers asked."""
    fetch = sum(v for k, v in ms.items() if k.startswith("fetch:"))
    return [f"{fetch:.2f}" if k == "fetch" else f"{ms.get(k, 0.0):.2f}" for k in STAGES]


def _stage_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The per-stage table: where each attach row's time goes, and what is unaccounted (the
    attach's median TTFT over the prefix hit's, less the lookup and the worker's load)."""
    staged = [r for r in rows if r.get("stage_ms")]
    if not staged:
        return []
    out = ["**Where an attach's time goes: median ms per stage (the connector's report)**\n"]
    out.append("| model | tokens | load | config | " + " | ".join(STAGES) + " | unaccounted ms |")
    out.append("|---|---:|---|---|" + "---:|" * (len(STAGES) + 1))
    for r in staged:
        cells = " | ".join(_stage_cells(r["stage_ms"]))
        out.append(
            f"| {r['model']} | {r['tokens']} | {r['load']} | {_label(r['config'])} | {cells} "
            f"| {r.get('unaccounted_ms', 0.0):.1f} |"
        )
    out.append("")
    return out


def markdown(doc: dict[str, Any], scheme: str = "int4") -> str:
    """The tables of docs/benchmarks.md, from a ``--json`` file: per model, length and load,
    the references and the ``scheme`` rows (p50 with p25 to p75, the ratio to the prefix hit
    with its 95 % interval, the encrypted/plain ratio and the AES-GCM open time per attach);
    then the cost of encryption for every scheme."""
    rows = [r for r in doc["rows"] if _scheme(r["config"]) in (None, scheme)]
    out: list[str] = []
    keys = dict.fromkeys((r["model"], r["tokens"], r["load"]) for r in rows)
    for model, tokens, load in keys:
        out.append(f"**{model}, {tokens} tokens, {load}**\n")
        out.append(
            f"| config | TTFT p50 ms (p25{DASH}p75) | {TIMES} prefix hit [95 % CI] "
            f"| {TIMES} faster than cold "
            "| encrypted / plain [95 % CI] | AES-GCM open ms |"
        )
        out.append("|---|---:|---:|---:|---:|---:|")
        sel = [r for r in rows if (r["model"], r["tokens"], r["load"]) == (model, tokens, load)]
        sel.sort(key=lambda r: (r["config"] != "vllm-prefix-hit", r["vs_prefix_hit"]))
        for r in sel:
            ci = r["vs_prefix_hit_ci95"]
            enc = ""
            if "vs_unencrypted" in r:
                e = r["vs_unencrypted_ci95"]
                enc = f"{r['vs_unencrypted']:.3f} [{e[0]:.3f}, {e[1]:.3f}]"
            cold = "" if r["speedup_vs_cold"] is None else f"{r['speedup_vs_cold']:.1f}"
            opened = f"{r['open_ms_per_attach']:.3f}" if "open_ms_per_attach" in r else ""
            out.append(
                f"| {_label(r['config'])} | {r['ttft_ms']:.1f} ({r['p25_ms']:.1f}{DASH}"
                f"{r['p75_ms']:.1f}) | {r['vs_prefix_hit']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] "
                f"| {cold} | {enc} | {opened} |"
            )
        out.append("")
    out.extend(_stage_markdown(rows))
    out.append("**Encryption at rest: encrypted / plain attach TTFT, every scheme**\n")
    out.append(
        "| model | tokens | load | tier | scheme | encrypted / plain [95 % CI] "
        "| AES-GCM open ms per attach | share of the attach |"
    )
    out.append("|---|---:|---|---|---|---:|---:|---:|")
    for r in doc["rows"]:
        if "vs_unencrypted" not in r:
            continue
        _, tier, sch = r["config"].split("-")[:3]
        e = r["vs_unencrypted_ci95"]
        share = 100 * r["open_ms_per_attach"] / r["ttft_ms"]
        out.append(
            f"| {r['model']} | {r['tokens']} | {r['load']} | {tier} | {sch} "
            f"| {r['vs_unencrypted']:.3f} [{e[0]:.3f}, {e[1]:.3f}] "
            f"| {r['open_ms_per_attach']:.3f} | {share:.3f} % |"
        )
    out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1k tokens, int4 only")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--rounds", type=int, help="rounds per length (half idle, half loaded)")
    ap.add_argument("--redis-url", help="Redis for the chunks (default: a throw-away server)")
    ap.add_argument("--model", help="run this model of the full run only")
    ap.add_argument("--markdown", type=Path, help="print the docs tables of a --json file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.worker:
        spec = json.loads(args.worker)
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return 0

    from kvaas.codec.sizing import read_kv_shape
    from kvaas.model_presets import build_model, resolve_model

    t0 = time.perf_counter()
    data = Path(tempfile.gettempdir()) / "kvaas-bench"
    # (model, dir, lengths, schemes, rounds, cold rounds, loaded rounds too). The 0.5B shape
    # runs idle only and int4 only: a 4k-token round takes seconds there, and the full run must
    # stay under 20 minutes on a 2-core machine.
    plan: list[tuple[str, Path, list[int], list[str], int, int, bool]] = []
    if args.quick:
        tiny = resolve_model("tiny", data)
        plan.append(("tiny", tiny, [1024], ["int4"], args.rounds or 8, 1, True))
    else:
        tiny = resolve_model("tiny", data)
        plan.append(
            ("tiny", tiny, [1024, 2048], ["none", "int8", "int4"], args.rounds or 20, 2, True)
        )
        shape = build_model("qwen2.5-0.5b-shape", data / "qwen2.5-0.5b-shape")
        plan.append(
            ("qwen2.5-0.5b-shape", shape, [1024, 2048, 4000], ["int4"], args.rounds or 6, 1, False)
        )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the servers below
    plan = [p for p in plan if args.model in (None, p[0])]
    redis_proc = None
    redis_url = args.redis_url
    if redis_url is None:
        redis_url, redis_proc, _ = start_redis()
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"models": {}}
    try:
        for name, model_dir, lengths, schemes, rounds, cold_rounds, loaded in plan:
            cfg = json.loads((model_dir / "config.json").read_text())
            print(
                f"[{name}] {lengths} tokens, {schemes}, {rounds} rounds ...",
                file=sys.stderr,
                flush=True,
            )
            spec = {
                "model_dir": str(model_dir),
                "lengths": lengths,
                "vocab": cfg["vocab_size"],
                "schemes": schemes,
                "rounds": rounds,
                "cold_rounds": cold_rounds,
                "loaded": loaded,
                "redis_url": redis_url,
                "memory_bytes": 2 << 30,
            }
            res = run_worker(spec)
            bpt = read_kv_shape(model_dir, "float32").bytes_per_token  # as run
            rows.extend(summarize(name, res, lengths, bpt))
            meta["models"][name] = {
                **res["info"],
                "rounds": rounds,
                "schemes": schemes,
                "loaded_rounds": loaded,
            }
            if args.json:  # after each model: a run cut short keeps what it measured
                meta["wall_s"] = round(time.perf_counter() - t0, 1)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    finally:
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["nice"] = os.nice(0)
    print_table(rows, "TTFT, one engine per model, configurations interleaved (CPU engine)")
    print(f"wall time {meta['wall_s']} s", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
