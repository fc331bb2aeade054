"""Per-stage timings of the connector's loads travel from the worker to the request's report.

A real worker connector loads a stored prefix from a disk store and sends its stage times with
its worker metadata; a real scheduler connector, which has already returned the request's
``kvaas`` report from ``request_finished`` (vLLM calls it before it hands the step's worker
output to ``update_connector_output``), completes that same report; the gateway's side records
the report in the ``kvaas_connector_load_stage_seconds`` histogram.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from kvtest.vllm_config import connector_config, layer_names
from prometheus_client import REGISTRY
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvaas import codec
from kvaas.connector import transfer_config
from kvaas.connector.connector import (
    KVaaSConnector,
    KVaaSConnectorMetadata,
    KVaaSWorkerMetadata,
    LoadTask,
    Sealing,
)
from kvaas.connector.params import TransferPlan
from kvaas.connector.timings import observe_load_report
from kvaas.store.crypto import TenantKeys
from kvaas.store.factory import StoreConfig
from kvaas.store.keys import ChunkKey
from kvaas.store.sync import SyncTieredStore

LAYERS, HEADS, DIM, BLOCK, CHUNK, CHUNKS = 2, 2, 16, 16, 32, 2
NAMES = layer_names(LAYERS)


def _config(path: Path) -> Any:
    store = StoreConfig(memory_bytes=0, disk_dir=path, disk_bytes=64 << 20, redis_url=None)
    return connector_config(
        transfer_config(store.to_dict()), layers=LAYERS, heads=HEADS, dim=DIM, block=BLOCK
    )


def _stored(path: Path) -> tuple[tuple[ChunkKey, ...], TenantKeys, Sealing]:
    """``CHUNKS`` sealed int4 chunks of random KV on a disk store at ``path``: their keys,
    the tenant's keys and the plan's sealing."""
    keys = tuple(ChunkKey(os.urandom(32)) for _ in range(CHUNKS))
    seal = TenantKeys("k1", {"k1": secrets.token_bytes(32)})
    sealing = Sealing(seal, "fp", "int4")
    store_cfg = StoreConfig(memory_bytes=0, disk_dir=path, disk_bytes=64 << 20, redis_url=None)
    with SyncTieredStore.from_config(store_cfg) as store:
        kv = torch.randn(LAYERS, 2, CHUNKS * CHUNK, HEADS, DIM)
        blobs = [codec.encode(kv[:, :, i * CHUNK : (i + 1) * CHUNK].contiguous(), "int4")
                 for i in range(CHUNKS)]  # fmt: skip
        store.put_chunks(list(zip(keys, blobs, strict=True)), "cold", sealing.sealer())
    return keys, seal, sealing


def test_a_load_reports_its_stages_in_the_same_step_it_finishes(tmp_path: Path) -> None:
    keys, seal, sealing = _stored(tmp_path)

    sched = KVaaSConnector(_config(tmp_path), KVConnectorRole.SCHEDULER, None)  # type: ignore[arg-type]
    worker = KVaaSConnector(_config(tmp_path), KVConnectorRole.WORKER, None)  # type: ignore[arg-type]
    layers = [torch.zeros(8, HEADS, BLOCK, 2 * DIM) for _ in NAMES]
    worker.register_kv_caches(dict(zip(NAMES, layers, strict=True)))
    try:
        plan = TransferPlan("load", keys, CHUNK, "int4", fingerprint="fp", seal=seal)
        req = SimpleNamespace(
            request_id="r1",
            kv_transfer_params=plan.to_params(),
            prompt_token_ids=list(range(CHUNKS * CHUNK + 3)),
        )
        n, _ = sched.get_num_new_matched_tokens(req, 0)  # type: ignore[arg-type]
        assert n == CHUNKS * CHUNK

        # the worker loads (one step), then the request finishes in that same step
        load = LoadTask("r1", keys, CHUNK, 0, CHUNKS * CHUNK, (3, 0, 6, 1), sealing)
        worker.bind_connector_metadata(KVaaSConnectorMetadata(loads=[load]))
        worker.start_load_kv(None)  # type: ignore[arg-type]
        worker.clear_connector_metadata()
        assert worker.get_block_ids_with_load_errors() == set()
        meta = worker.build_connector_worker_meta()
        assert isinstance(meta, KVaaSWorkerMetadata)
        ms = meta.load_ms["r1"]
        for stage in ("store", "fetch:disk", "verify", "decode", "copy", "load"):
            assert ms[stage] >= 0, stage
        assert ms["load"] >= ms["store"] and ms["store"] >= ms["fetch:disk"]
        assert worker.build_connector_worker_meta() is None  # sent once

        _, params = sched.request_finished(req, [3, 0, 6, 1])  # type: ignore[arg-type]
        assert params is not None
        report = params["kvaas"]
        assert set(report["load_ms"]) == {"lookup"}  # the worker's figures are not in yet
        sched.update_connector_output(SimpleNamespace(kv_connector_worker_meta=meta))
        assert report["load_ms"]["decode"] == ms["decode"]  # the same report, completed
        assert report["load_ms"]["lookup"] >= 0

        def count(stage: str, tier: str) -> float:
            labels = {"stage": stage, "tier": tier}
            got = REGISTRY.get_sample_value("kvaas_connector_load_stage_seconds_count", labels)
            return got or 0.0

        before = count("fetch", "disk"), count("decode", "all")
        assert observe_load_report(report) == len(report["load_ms"])
        assert (count("fetch", "disk"), count("decode", "all")) == (before[0] + 1, before[1] + 1)
    finally:
        sched.shutdown()
        worker.shutdown()


def test_a_malformed_report_records_nothing() -> None:
    assert observe_load_report({}) == 0
    assert observe_load_report({"load_ms": "slow"}) == 0
    assert observe_load_report({"load_ms": {"decode": "x", "copy": -1.0, "load": True}}) == 0


def test_the_report_says_how_many_tokens_the_memory_tier_served(tmp_path: Path) -> None:
    """A first load reads the disk tier (and promotes); the second, of the same chunks, is
    served by the worker's memory tier: its report says so (what a gateway counts per node)."""
    keys, seal, sealing = _stored(tmp_path)

    config = _config(tmp_path)
    with_memory = StoreConfig(
        memory_bytes=16 << 20, disk_dir=tmp_path, disk_bytes=64 << 20, redis_url=None
    )
    config.kv_transfer_config = SimpleNamespace(**transfer_config(with_memory.to_dict()))
    sched = KVaaSConnector(_config(tmp_path), KVConnectorRole.SCHEDULER, None)  # type: ignore[arg-type]
    worker = KVaaSConnector(config, KVConnectorRole.WORKER, None)  # type: ignore[arg-type]
    layers = [torch.zeros(8, HEADS, BLOCK, 2 * DIM) for _ in NAMES]
    worker.register_kv_caches(dict(zip(NAMES, layers, strict=True)))
    plan = TransferPlan("load", keys, CHUNK, "int4", fingerprint="fp", seal=seal)
    try:
        served = []
        for rid in ("first", "second"):
            req = SimpleNamespace(
                request_id=rid,
                kv_transfer_params=plan.to_params(),
                prompt_token_ids=list(range(CHUNKS * CHUNK + 3)),
            )
            sched.get_num_new_matched_tokens(req, 0)  # type: ignore[arg-type]
            load = LoadTask(rid, keys, CHUNK, 0, CHUNKS * CHUNK, (3, 0, 6, 1), sealing)
            worker.bind_connector_metadata(KVaaSConnectorMetadata(loads=[load]))
            worker.start_load_kv(None)  # type: ignore[arg-type]
            worker.clear_connector_metadata()
            meta = worker.build_connector_worker_meta()
            assert isinstance(meta, KVaaSWorkerMetadata)
            sched.update_connector_output(SimpleNamespace(kv_connector_worker_meta=meta))
            _, params = sched.request_finished(req, [3, 0, 6, 1])  # type: ignore[arg-type]
            assert params is not None
            served.append(params["kvaas"]["memory_tokens"])
        assert served == [0, CHUNKS * CHUNK]
    finally:
        sched.shutdown()
        worker.shutdown()
