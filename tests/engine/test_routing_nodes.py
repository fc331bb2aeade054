"""Cache-aware routing over two real ``vllm serve`` nodes (the tiny model, started by the
printed node command; bench/scaleout.py's launcher), sharing a throw-away Redis, each with a
private memory tier:

- once a cache was saved and attached on a node (the attach promotes its chunks from Redis into
  that node's memory tier), its attaches go to that node and read nothing from Redis; with
  least-in-flight routing the same attaches go to the idle other node, which has to read the
  chunks from Redis (the checks the cache-aware policy passes fail there);
- when that node is killed, the next attach fails over to the other node, succeeds with the
  same greedy output (its chunks come from Redis) and the cache stays on the new node.

Which node served a request is counted on the nodes themselves (vLLM's request counter on each
node's ``/metrics``), not taken from the router.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import redis

from kvaas.codec.sizing import kv_dtype
from kvaas.connector.params import TransferPlan
from kvaas.engine import ModelInfo, Sampling
from kvaas.engine.remote import ROUTES, RemoteEngine
from kvaas.model_presets import resolve_model
from kvaas.store.crypto import TenantKeys
from kvaas.store.factory import StoreConfig
from kvaas.store.keys import chunk_keys, derive_namespace

pytestmark = [pytest.mark.engine, pytest.mark.slow]

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "scaleout.py"


def _scaleout() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvaas_bench_scaleout", _BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Pool:
    model: ModelInfo
    urls: list[str]
    redis_url: str
    nodes: list[object]
    bench: ModuleType


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    bench = _scaleout()
    data = tmp_path_factory.mktemp("models")
    model_dir = resolve_model("tiny", data)
    dtype = kv_dtype(model_dir, "auto")
    model = ModelInfo.load(model_dir, "tiny", dtype)
    redis_url, proc, workdir = bench.start_redis()
    store = StoreConfig(
        memory_bytes=64 * 2**20,
        disk_dir=None,
        disk_bytes=0,
        redis_url=redis_url,
        redis_prefix="routing",
    ).to_dict()
    nodes = []
    try:
        nodes = bench.start_pool(model_dir, store, 2, tmp_path_factory.mktemp("nodes"))
        yield Pool(model, [n.url for n in nodes], redis_url, nodes, bench)
    finally:
        for n in nodes:
            n.kill()
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def served(url: str) -> int:
    """Requests the node finished, by its own counter."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return int(
        sum(
            float(m.group(1))
            for m in re.finditer(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
        )
    )


def redis_gets(url: str) -> int:
    """Chunk reads Redis answered (MGET/GET calls: the scheduler's lookups are scripts)."""
    stats = redis.Redis.from_url(url).info("commandstats")
    return sum(int(stats.get(c, {}).get("calls", 0)) for c in ("cmdstat_mget", "cmdstat_get"))


class Cache:
    """One cache of 2 chunks (512 tokens) under a fresh namespace."""

    def __init__(self, model: ModelInfo, seed: int) -> None:
        rng = random.Random(seed)
        self.tokens = [rng.randrange(100, 4000) for _ in range(600)]
        ns = derive_namespace(rng.randbytes(32))
        keys = chunk_keys(
            self.tokens, namespace=ns, model_fingerprint=model.fingerprint, scheme_id="int4"
        )
        seal = TenantKeys("k1", {"k1": rng.randbytes(32)})
        args = (tuple(keys), 256, "int4")
        self.save = TransferPlan("save", *args, fingerprint=model.fingerprint, seal=seal)
        self.load = TransferPlan("load", *args, fingerprint=model.fingerprint, seal=seal)


GREEDY = Sampling(max_tokens=4, temperature=0.0)


def engine(p: Pool, routing: str) -> RemoteEngine:
    return RemoteEngine(
        p.model,
        p.urls,
        routing=routing,
        max_failures=1,
        cooldown_s=3600.0,
        probe_every_s=3600.0,
        timeout_s=120.0,
    )


async def while_first_node_busy(
    eng: RemoteEngine, tokens: list[int], plan: TransferPlan
) -> dict[str, object]:
    """Run one request while the first node is busy with a long generation, so that every
    policy sends it to the second node (the first one is never idler): its connector report."""
    busy = asyncio.create_task(eng.generate([5] * 32, Sampling(max_tokens=400, temperature=0.0)))
    await asyncio.sleep(0)  # the task runs up to its request: in flight on the first node
    assert eng.nodes[0].inflight == 1
    g = await eng.generate(tokens, Sampling(max_tokens=1, temperature=0.0), plan)
    await busy
    return g.connector


async def save_on_second_node(eng: RemoteEngine, cache: Cache) -> None:
    """Save ``cache`` on the second node, then attach it there once: a save writes the shared
    tier only, the first attach on a node promotes the chunks into its memory tier."""
    report = await while_first_node_busy(eng, cache.tokens, cache.save)
    assert report.get("saved_chunks") == 2, report
    report = await while_first_node_busy(eng, [*cache.tokens, 3], cache.load)
    assert report.get("matched_tokens") == 512, report


@pytest.mark.parametrize("routing", ["cache_aware", "least_loaded"])
async def test_attaches_go_to_the_node_that_saved_the_cache(pool: Pool, routing: str) -> None:
    eng = engine(pool, routing)
    await eng.start()
    try:
        cache = Cache(pool.model, seed=1 if routing == "cache_aware" else 2)
        await save_on_second_node(eng, cache)
        saver, other = pool.urls[1], pool.urls[0]
        before = {u: served(u) for u in pool.urls}
        gets = redis_gets(pool.redis_url)
        for i in range(3):
            g = await eng.generate([*cache.tokens, 7 + i], GREEDY, cache.load)
            assert g.connector.get("matched_tokens") == 512, g.connector
        on_saver = served(saver) - before[saver]
        on_other = served(other) - before[other]
        read_from_redis = redis_gets(pool.redis_url) - gets
        if routing == "least_loaded":  # what the cache-aware policy fixes
            assert (on_saver, on_other) == (0, 3)
            assert read_from_redis >= 1
            return
        assert (on_saver, on_other) == (3, 0)
        assert read_from_redis == 0  # the saver's memory tier served every attach
        assert ROUTES.labels(saver, "affinity")._value.get() >= 3
    finally:
        await eng.shutdown()


async def test_attaches_fail_over_when_the_saving_node_is_killed(pool: Pool) -> None:
    eng = engine(pool, "cache_aware")
    await eng.start()
    try:
        cache = Cache(pool.model, seed=3)
        await save_on_second_node(eng, cache)
        prompt = [*cache.tokens, 11]
        ref = await eng.generate(prompt, GREEDY, cache.load)
        assert eng.router.nodes_for(cache.load.keys) == [pool.urls[1]]
        pool.nodes[1].kill()  # type: ignore[attr-defined]
        before = served(pool.urls[0])
        routes = {
            r: ROUTES.labels(pool.urls[0], r)._value.get() for r in ("least_loaded", "affinity")
        }
        for _ in range(2):
            g = await eng.generate(prompt, GREEDY, cache.load)
            assert g.token_ids == ref.token_ids
            assert g.connector.get("matched_tokens") == 512, g.connector  # loaded from Redis
        assert served(pool.urls[0]) - before == 2
        assert eng.router.nodes_for(cache.load.keys) == [pool.urls[0]]
        # the first went to the dead node, was refused a connection and retried on the other
        # (the dead node forgotten: least loaded); the second followed the cache there
        after = {r: ROUTES.labels(pool.urls[0], r)._value.get() for r in routes}
        assert after["least_loaded"] - routes["least_loaded"] == 1
        assert after["affinity"] - routes["affinity"] == 1
        assert "1/2" in await eng.health()
    finally:
        await eng.shutdown()
