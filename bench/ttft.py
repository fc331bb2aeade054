"""Time to first token: cold prefill vs reusing KV, on the real vLLM engine.

For each model and prompt length, the median TTFT (wall time of a one-token generation,
measured the same way for every row) of:

- ``cold``: full prefill of a prompt the engine has never seen;
- ``vllm-prefix-hit``: the same prompt again in an engine with vLLM's prefix cache on (the
  no-transfer limit: the KV is already in the engine's memory);
- ``example-connector``: vLLM's built-in disk connector (``ExampleConnector``) loading a prompt
  it stored;
- ``kvaas-<tier>-<scheme>``: attach through the KVaaS connector with the chunks in the
  ``disk`` tier (class ``cold``, first read), the ``redis`` tier (class ``hot``, first read)
  or the worker's ``memory`` tier (a second read: the first one promoted them), encrypted at
  rest as in production; ``...-unencrypted``: the same with a store that keeps plain codec
  containers (the cost of encryption is the difference).

Every configuration runs in its own engine process (vLLM's prefix cache off for the
connectors, so each attach really loads). ``load GB/s`` is the raw KV bytes of the loaded
tokens divided by the TTFT above the prefix-hit TTFT of the same length.

    python bench/ttft.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPS = 3


def _engine(model_dir: str, kv: dict[str, Any] | None, prefix_caching: bool) -> Any:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM
    from vllm.config import KVTransferConfig

    return LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=4096,
        max_num_batched_tokens=2048,
        enforce_eager=True,
        enable_prefix_caching=prefix_caching,
        kv_transfer_config=KVTransferConfig(**kv) if kv else None,
        disable_log_stats=True,
    )


def _ttft(llm: Any, ids: list[int], params: dict[str, Any] | None = None) -> tuple[float, int]:
    from vllm import SamplingParams

    extra = {"kv_transfer_params": params} if params else None
    sp = SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
    return (time.perf_counter() - t0) * 1e3, int(out.num_cached_tokens or 0)


def _prompts(vocab: int, length: int, n: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[1] + [rng.randrange(10, vocab) for _ in range(length - 1)] for _ in range(n)]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one engine configuration; return {row name: [ttft ms...]} per length."""
    kind, model_dir, lengths = spec["kind"], spec["model_dir"], spec["lengths"]
    vocab = spec["vocab"]
    res: dict[str, Any] = {}
    if kind == "baseline":
        llm = _engine(model_dir, None, True)
        _ttft(llm, _prompts(vocab, 256, 1, 99)[0])  # warm-up
        for n in lengths:
            prompts = _prompts(vocab, n, REPS, n)
            res[f"cold/{n}"] = [_ttft(llm, p)[0] for p in prompts]
            res[f"vllm-prefix-hit/{n}"] = [_ttft(llm, p)[0] for p in prompts]
        return res
    if kind == "example":
        path = tempfile.mkdtemp(prefix="kvaas-bench-example-")
        kv = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": path},
        }
        llm = _engine(model_dir, kv, False)
        _ttft(llm, _prompts(vocab, 256, 1, 99)[0])
        for n in lengths:
            prompts = _prompts(vocab, n, REPS, n)
            for p in prompts:
                _ttft(llm, p)  # stores
            res[f"example-connector/{n}"] = [_ttft(llm, p)[0] for p in prompts]
        return res
    # kvaas (encrypted or not): one engine with memory + redis + disk tiers
    from kvaas.connector import TransferPlan, transfer_config
    from kvaas.store.crypto import MasterKeys
    from kvaas.store.factory import StoreConfig
    from kvaas.store.keys import chunk_keys, derive_namespace

    encrypted = kind == "kvaas"
    suffix = "" if encrypted else "-unencrypted"

    root = Path(tempfile.mkdtemp(prefix="kvaas-bench-store-"))
    cfg = StoreConfig(
        memory_bytes=4 << 30,
        disk_dir=root / "chunks",
        disk_bytes=64 << 30,
        redis_url=spec["redis_url"],
        redis_prefix=f"bench-ttft-{os.getpid()}",
        encrypted=encrypted,
    )
    llm = _engine(model_dir, transfer_config(cfg.to_dict()), False)
    ns = derive_namespace(os.urandom(32))
    seal = MasterKeys("k1", {"k1": os.urandom(32)}).tenant_keys(ns) if encrypted else None
    _ttft(llm, _prompts(vocab, 256, 1, 99)[0])
    for si, scheme in enumerate(spec["schemes"]):
        for ti, (tier, cls) in enumerate((("disk", "cold"), ("redis", "hot"))):
            if tier == "redis" and not spec["redis_url"]:
                continue
            for n in lengths:
                prompts = _prompts(vocab, n, REPS, n * 100 + 10 * si + ti + 1)
                plans = []
                for p in prompts:
                    keys = tuple(
                        chunk_keys(p, namespace=ns, model_fingerprint="bench", scheme_id=scheme)
                    )
                    fp = "bench"
                    save = TransferPlan("save", keys, 256, scheme, cls, fingerprint=fp, seal=seal)
                    _ttft(llm, p, save.to_params())
                    load = TransferPlan("load", keys, 256, scheme, fingerprint=fp, seal=seal)
                    plans.append(load.to_params())
                first = [_ttft(llm, p, plan) for p, plan in zip(prompts, plans, strict=True)]
                res[f"kvaas-{tier}-{scheme}{suffix}/{n}"] = [t for t, _ in first]
                res[f"cached/{n}"] = first[0][1]
                if tier == "disk":  # the first read promoted them into the memory tier
                    again = [_ttft(llm, p, plan)[0] for p, plan in zip(prompts, plans, strict=True)]
                    res[f"kvaas-memory-{scheme}{suffix}/{n}"] = again
    return res


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one engine configuration in its own process; its results come back in a file (the
    engine's own output on stdout and stderr cannot corrupt them)."""
    with tempfile.TemporaryDirectory(prefix="kvaas-ttft-") as tmp:
        result = Path(tmp) / "result.json"
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps({**spec, "result": str(result)})],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0 and result.exists():
            return dict(json.loads(result.read_text()))
    raise RuntimeError(f"{spec['kind']} engine failed:\n{out.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1k tokens, int4 only")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument(
        "--redis-url", default=os.environ.get("KVAAS_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return 0

    from rich.console import Console
    from rich.table import Table

    from kvaas.codec.sizing import read_kv_shape
    from kvaas.model_presets import build_model, resolve_model

    data = Path(tempfile.gettempdir()) / "kvaas-bench"
    models: list[tuple[str, Path, list[int]]] = [
        ("tiny", resolve_model("tiny", data), [1024] if args.quick else [1024, 2048])
    ]
    if not args.quick:
        shape = build_model("qwen2.5-0.5b-shape", data / "qwen2.5-0.5b-shape")
        models.append(("qwen2.5-0.5b-shape", shape, [1024, 2048, 4000]))
    schemes = ["int4"] if args.quick else ["none", "int8", "int4"]
    rows: list[dict[str, Any]] = []
    for name, model_dir, lengths in models:
        cfg = json.loads((model_dir / "config.json").read_text())
        kv_bytes_per_token = read_kv_shape(model_dir, "float32").bytes_per_token  # as run
        results: dict[str, Any] = {}
        for kind in ("baseline", "example", "kvaas", "kvaas-unencrypted"):
            print(f"[{name}] running the {kind} engine ...", file=sys.stderr, flush=True)
            spec = {
                "kind": kind,
                "model_dir": str(model_dir),
                "lengths": lengths,
                "vocab": cfg["vocab_size"],
                "schemes": schemes,
                "redis_url": args.redis_url,
            }
            results.update(run_worker(spec))
        for n in lengths:
            hit = statistics.median(results[f"vllm-prefix-hit/{n}"])
            cold = statistics.median(results[f"cold/{n}"])
            cached = results.get(f"cached/{n}", 0)
            for key in sorted(k for k in results if k.endswith(f"/{n}") and k != f"cached/{n}"):
                label = key.rsplit("/", 1)[0]
                ttft = statistics.median(results[key])
                extra_s = (ttft - hit) / 1e3
                gbps = (
                    cached * kv_bytes_per_token / extra_s / 1e9
                    if label.startswith("kvaas") and extra_s > 0
                    else None
                )
                rows.append(
                    {
                        "model": name,
                        "tokens": n,
                        "config": label,
                        "ttft_ms": round(ttft, 2),
                        "vs_prefix_hit": round(ttft / hit, 3),
                        "speedup_vs_cold": round(cold / ttft, 2),
                        "load_gbps": round(gbps, 3) if gbps else None,
                        "samples_ms": [round(x, 2) for x in results[key]],
                    }
                )
    table = Table(title="TTFT (median of 3, one-token generations, CPU engine)")
    for col in (
        "model",
        "tokens",
        "config",
        "TTFT ms",
        "x prefix hit",
        "x faster than cold",
        "load GB/s",
    ):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["model"],
            str(r["tokens"]),
            r["config"],
            f"{r['ttft_ms']:.1f}",
            f"{r['vs_prefix_hit']:.2f}",
            f"{r['speedup_vs_cold']:.1f}",
            "" if r["load_gbps"] is None else f"{r['load_gbps']:.2f}",
        )
    Console(width=140).print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
