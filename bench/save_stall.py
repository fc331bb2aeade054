"""Engine stall from chunk saves: TTFT of a create (a save plan) and of an attach running
beside it, with saves synchronous (``save_queue_bytes = 0``: the step encodes and stores) and in
the background (:mod:`kvaas.connector.saver`): one engine process per mode, run one after the
other (``--twice``: sync, background, sync, background, so that a drift of the machine shows).

Per sample, in a shuffled order:

- ``create``: a fresh prompt of ``--create-tokens`` with a save plan (int4, sealed, storage
  class ``cold``: the disk tier): its TTFT, and ``create-durable``, the time until every one of
  its chunks is in the store (the bench polls the disk tier, as the gateway does);
- ``attach``: a stored prompt of ``--attach-tokens`` loaded from the disk tier, alone;
- ``attach+create``: the same attach submitted together with a create (both in flight at once):
  the attach's TTFT (``attach|busy``) and the create's (``create|busy``).

Every sample waits until the previous create is durable, so no save of one sample runs into
the next. The engine is vLLM's ``AsyncLLM`` (engine core in its own process) on the tiny model,
one OpenMP thread, prefix caching off.

    python bench/save_stall.py [--quick] [--json PATH] [--samples N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

CHUNK = 256
FINGERPRINT = "bench"
MODES = {"sync": 0, "background": 64 * 1024**2}


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


async def _rig(
    spec: dict[str, Any], mode: str, out: dict[str, dict[str, list[float]]]
) -> tuple[list[Callable[[], Awaitable[None]]], Callable[[], None]]:
    """One engine saving in ``mode``: its three sample functions (recording into
    ``out[mode]``) and its shutdown."""
    from vllm import SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from kvaas.connector import TransferPlan, transfer_config
    from kvaas.store.crypto import MasterKeys
    from kvaas.store.factory import StoreConfig
    from kvaas.store.keys import chunk_keys, derive_namespace
    from kvaas.store.sync import SyncTieredStore

    root = Path(tempfile.mkdtemp(prefix="kvaas-bench-save-"))
    store = StoreConfig(
        memory_bytes=256 * 1024**2,
        disk_dir=root,
        disk_bytes=16 << 30,
        redis_url=None,
        encrypted=True,
    )
    args = AsyncEngineArgs(
        model=spec["model_dir"],
        dtype="float32",
        max_model_len=4096,
        max_num_batched_tokens=4096,
        enforce_eager=True,
        enable_prefix_caching=False,
        kv_transfer_config=KVTransferConfig(
            **transfer_config(store.to_dict(), save_queue_bytes=MODES[mode])
        ),
        disable_log_stats=True,
    )
    llm = AsyncLLM.from_engine_args(args)
    reader = SyncTieredStore.from_config(
        StoreConfig.from_dict({**store.to_dict(), "memory_bytes": 0})
    )
    master = MasterKeys("k1", {"k1": os.urandom(32)})
    rng = random.Random(7)
    vocab = spec["vocab"]
    n_req = iter(range(10**9))
    rows = out.setdefault(mode, {})

    def prompt(n: int) -> list[int]:
        return [1] + [rng.randrange(10, vocab) for _ in range(n - 1)]

    def plan(op: str, ids: list[int], ns: bytes | None = None) -> tuple[dict[str, Any], list[Any]]:
        ns = ns or derive_namespace(os.urandom(32))
        keys = list(chunk_keys(ids, namespace=ns, model_fingerprint=FINGERPRINT, scheme_id="int4"))
        p = TransferPlan(
            op,  # type: ignore[arg-type]
            tuple(keys),
            CHUNK,
            "int4",
            "cold",
            fingerprint=FINGERPRINT,
            seal=master.tenant_keys(ns),
        )
        return p.to_params(), keys

    async def ttft(ids: list[int], params: dict[str, Any]) -> float:
        sp = SamplingParams(
            max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": params}
        )
        t0 = time.perf_counter()
        async for _ in llm.generate({"prompt_token_ids": ids}, sp, f"r{next(n_req)}"):
            return (time.perf_counter() - t0) * 1e3
        raise RuntimeError("no output")

    async def durable(keys: list[Any], t0: float) -> float:
        """Time from ``t0`` until every chunk of ``keys`` is stored (polled every ms)."""
        for _ in range(600_000):
            if all(await asyncio.to_thread(reader.exists_many, keys)):
                return (time.perf_counter() - t0) * 1e3
            await asyncio.sleep(0.001)
        raise RuntimeError("chunks never reached the store")

    attach_ids = prompt(spec["attach_tokens"])
    ns = derive_namespace(os.urandom(32))
    save_params, attach_keys = plan("save", attach_ids, ns)
    await ttft(attach_ids, save_params)  # store the attach target once (and warm up)
    await durable(attach_keys, time.perf_counter())
    load_params, _ = plan("load", attach_ids, ns)
    for _ in range(2):  # warm-up of both paths
        await ttft(attach_ids, load_params)
        ids = prompt(spec["create_tokens"])
        params, keys = plan("save", ids)
        await ttft(ids, params)
        await durable(keys, time.perf_counter())

    async def create() -> None:
        ids = prompt(spec["create_tokens"])
        params, keys = plan("save", ids)
        t0 = time.perf_counter()
        rows.setdefault("create", []).append(await ttft(ids, params))
        rows.setdefault("create-durable", []).append(await durable(keys, t0))

    async def attach() -> None:
        rows.setdefault("attach", []).append(await ttft(attach_ids, load_params))

    async def both() -> None:
        ids = prompt(spec["create_tokens"])
        params, keys = plan("save", ids)
        t0 = time.perf_counter()
        c, a = await asyncio.gather(ttft(ids, params), ttft(attach_ids, load_params))
        rows.setdefault("create|busy", []).append(c)
        rows.setdefault("attach|busy", []).append(a)
        await durable(keys, t0)

    def close() -> None:
        llm.shutdown()
        reader.close()

    return [create, attach, both], close


async def _worker(spec: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """The engine of ``spec["mode"]``, its samples in a shuffled order."""
    out: dict[str, dict[str, list[float]]] = {}
    rigs = {mode: await _rig(spec, mode, out) for mode in [spec["mode"]]}
    rng = random.Random(11)
    try:
        for i in range(spec["samples"]):
            order = [fn for fns, _ in rigs.values() for fn in fns]
            rng.shuffle(order)
            for fn in order:
                await fn()
            print(f"  sample {i + 1}/{spec['samples']}", file=sys.stderr, flush=True)
    finally:
        for _, close in rigs.values():
            close()
    return out


def _run(spec: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        env.setdefault("HF_HUB_OFFLINE", "1")
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps({**spec, "result": str(result)})],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not result.exists():
            lines = [x for x in proc.stderr.splitlines() if "Error" in x or "error" in x]
            raise SystemExit("the bench failed:\n" + "\n".join(lines[-20:]))
        return dict(json.loads(result.read_text()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 samples per mode")
    ap.add_argument("--samples", type=int, help="samples per configuration and mode")
    ap.add_argument("--create-tokens", type=int, default=2048)
    ap.add_argument("--attach-tokens", type=int, default=1024)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--twice", action="store_true", help="run the modes as A B A B")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        Path(spec["result"]).write_text(json.dumps(asyncio.run(_worker(spec))))
        return 0
    from kvaas.model_presets import resolve_model

    model_dir = resolve_model("tiny", Path(tempfile.gettempdir()) / "kvaas-bench")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    samples = args.samples or (4 if args.quick else 12)
    results: dict[str, dict[str, list[float]]] = {}
    for mode in ["sync", "background", "sync", "background"][: 4 if args.twice else 2]:
        spec = {
            "mode": mode,
            "model_dir": str(model_dir),
            "vocab": vocab,
            "samples": samples,
            "create_tokens": args.create_tokens,
            "attach_tokens": args.attach_tokens,
        }
        for row, xs in _run(spec)[mode].items():
            results.setdefault(mode, {}).setdefault(row, []).extend(xs)
    rows = ["create", "create-durable", "attach", "attach|busy", "create|busy"]
    print(
        f"\nTTFT in ms, tiny model, create {args.create_tokens} / attach {args.attach_tokens} "
        f"tokens, int4 sealed, disk tier; p50 [p25-p75] of {samples} samples per run"
    )
    print(f"{'row':<16}" + "".join(f"{m:>26}" for m in MODES))
    table: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        cells = ""
        for mode in MODES:
            q = _quartiles(results[mode][row])
            table.setdefault(row, {})[mode] = [round(x, 2) for x in q]
            cells += f"{q[1]:>12.1f} [{q[0]:.1f}-{q[2]:.1f}]".rjust(26)
        print(f"{row:<16}{cells}")
    if args.json:
        args.json.write_text(json.dumps({"samples": results, "quartiles": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
