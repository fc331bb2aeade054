"""Layer-wise loads (:mod:`kvaas.connector.layerwise`, ``layerwise_loads`` in the connector's
extra config).

Through real :class:`KVaaSConnector` workers on a real disk store, into CPU tensors laid out as
vLLM's CPU backend makes them, called as vLLM calls them (``start_load_kv``, then
``wait_for_layer_load`` per layer in order, then ``wait_for_save``,
``get_block_ids_with_load_errors`` and ``build_connector_worker_meta``): each layer is in its
blocks once its wait returns, bit-exact with a synchronous load; a load that falls short
reports the same failed blocks and loaded tokens as the synchronous path; ``start_load_kv``
returns before the load is done; and the setting off keeps the synchronous load.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from kvtest.vllm_config import connector_config, layer_names
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvaas import codec
from kvaas.config import Settings
from kvaas.connector import transfer_config
from kvaas.connector.connector import (
    KVaaSConnector,
    KVaaSConnectorMetadata,
    KVaaSWorkerMetadata,
    LoadTask,
    Sealing,
)
from kvaas.connector.layerwise import HostOrder, LayerwiseLoads, device_order
from kvaas.store.crypto import TenantKeys
from kvaas.store.factory import StoreConfig
from kvaas.store.keys import ChunkKey
from kvaas.store.sync import SyncTieredStore

LAYERS, HEADS, DIM, BLOCK, CHUNK, CHUNKS = 4, 2, 16, 16, 32, 3
NAMES = layer_names(LAYERS)
NUM_BLOCKS = 16
BLOCKS_A = (5, 0, 9, 2, 7, 11)  # request a's blocks, out of order
BLOCKS_B = (1, 3, 4, 6, 8, 10)  # request b's
SENTINEL = 7.0


@dataclass
class Stored:
    """Chunks on a disk store: two requests' keys (``a`` and ``b``) and how they are sealed."""

    path: Path
    sealing: Sealing
    keys_a: tuple[ChunkKey, ...]
    keys_b: tuple[ChunkKey, ...]


def _store_cfg(path: Path) -> StoreConfig:
    return StoreConfig(memory_bytes=0, disk_dir=path, disk_bytes=64 << 20, redis_url=None)


def _blob(scheme: str, heads: int = HEADS) -> bytes:
    return codec.encode(torch.randn(LAYERS, 2, CHUNK, heads, DIM), scheme)


def _stored(path: Path, scheme: str, bad: dict[int, bytes | None] | None = None) -> Stored:
    """Store ``CHUNKS`` chunks for each of two requests; ``bad`` replaces request ``a``'s
    chunk ``i`` by another blob (``None``: not stored)."""
    seal = TenantKeys("k1", {"k1": secrets.token_bytes(32)})
    sealing = Sealing(seal, "fp", scheme)
    keys_a = tuple(ChunkKey(os.urandom(32)) for _ in range(CHUNKS))
    keys_b = tuple(ChunkKey(os.urandom(32)) for _ in range(CHUNKS))
    bad = bad or {}
    items: list[tuple[ChunkKey, bytes]] = []
    for i, k in enumerate(keys_a):
        blob = bad[i] if i in bad else _blob(scheme)
        if blob is not None:
            items.append((k, blob))
    items += [(k, _blob(scheme)) for k in keys_b]
    with SyncTieredStore.from_config(_store_cfg(path)) as store:
        store.put_chunks(items, "standard", sealing.sealer())
    return Stored(path, sealing, keys_a, keys_b)


def _worker(stored: Stored, layerwise: bool | None) -> tuple[KVaaSConnector, list[torch.Tensor]]:
    transfer = transfer_config(
        _store_cfg(stored.path).to_dict(), decoded_bytes=0, layerwise_loads=layerwise
    )
    cfg = connector_config(transfer, layers=LAYERS, heads=HEADS, dim=DIM, block=BLOCK)
    worker = KVaaSConnector(cfg, KVConnectorRole.WORKER, None)  # type: ignore[arg-type]
    # the CPU backend's layer tensors: [blocks, kv_heads, block_size, 2 * head_dim]
    layers = [torch.full((NUM_BLOCKS, HEADS, BLOCK, 2 * DIM), SENTINEL) for _ in NAMES]
    worker.register_kv_caches(dict(zip(NAMES, layers, strict=True)))
    return worker, layers


@pytest.fixture
def workers() -> Iterator[list[KVaaSConnector]]:
    made: list[KVaaSConnector] = []
    yield made
    for w in made:
        w.shutdown()


def _tasks(stored: Stored, ranges: Sequence[tuple[int, int]]) -> list[LoadTask]:
    """Request ``a``'s load of tokens ``ranges[0]``, then request ``b``'s of ``ranges[1]``."""
    out = []
    for (rid, keys, blocks), (start, end) in zip(
        (("a", stored.keys_a, BLOCKS_A), ("b", stored.keys_b, BLOCKS_B)), ranges, strict=False
    ):
        out.append(LoadTask(rid, keys, CHUNK, start, end, blocks, stored.sealing))
    return out


@dataclass
class Step:
    failed: set[int]
    meta: KVaaSWorkerMetadata | None
    after_wait: list[torch.Tensor]  # each layer as it was when its wait returned


def _step(
    worker: KVaaSConnector,
    layers: list[torch.Tensor],
    tasks: list[LoadTask],
    after_start: Callable[[], None] | None = None,
) -> Step:
    """One engine step as vLLM's model runner drives the connector."""
    worker.bind_connector_metadata(KVaaSConnectorMetadata(loads=tasks))
    try:
        worker.start_load_kv(None)  # type: ignore[arg-type]
        if after_start is not None:
            after_start()
        seen = []
        for name, t in zip(NAMES, layers, strict=True):
            worker.wait_for_layer_load(name)
            seen.append(t.clone())  # what the layer's attention would read now
        worker.wait_for_save()
        failed = worker.get_block_ids_with_load_errors()
        meta = worker.build_connector_worker_meta()
        assert meta is None or isinstance(meta, KVaaSWorkerMetadata)
        return Step(failed, meta, seen)
    finally:
        worker.clear_connector_metadata()


RANGES = {
    "whole": [(0, CHUNKS * CHUNK)],
    "from-block-1": [(BLOCK, CHUNKS * CHUNK - BLOCK)],
    "ragged": [(CHUNK + 3, 2 * CHUNK + 5)],
    "two-requests": [(0, CHUNKS * CHUNK), (BLOCK, 2 * CHUNK)],
}


@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
@pytest.mark.parametrize("ranges", list(RANGES.values()), ids=list(RANGES))
def test_each_layer_is_in_its_blocks_when_its_wait_returns_bit_exact(
    tmp_path: Path,
    workers: list[KVaaSConnector],
    scheme: str,
    ranges: list[tuple[int, int]],
) -> None:
    """The layer-wise worker's blocks, read as each layer's wait returns, hold exactly what a
    synchronous load of the same chunks writes; the step reports the same."""
    stored = _stored(tmp_path, scheme)
    sync, sync_layers = _worker(stored, layerwise=False)
    lw, lw_layers = _worker(stored, layerwise=True)
    workers += [sync, lw]
    want = _step(sync, sync_layers, _tasks(stored, ranges))
    got = _step(lw, lw_layers, _tasks(stored, ranges))
    assert lw._layerwise_loads is not None and sync._layerwise_loads is None
    for i in range(LAYERS):
        assert torch.equal(got.after_wait[i], want.after_wait[i]), f"layer {i}"
        assert torch.equal(lw_layers[i], sync_layers[i])
    assert not torch.equal(lw_layers[0], torch.full_like(lw_layers[0], SENTINEL))
    assert got.failed == want.failed == set()
    assert got.meta is not None and want.meta is not None
    assert got.meta.short_loads == want.meta.short_loads == {}
    assert set(got.meta.load_ms) == set(want.meta.load_ms) == set("ab"[: len(ranges)])


BAD = {
    "missing": {1: None},
    "other-shape": {1: b""},  # replaced below by a blob of another head count
    "first-missing": {0: None},
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("read_errors_first", [False, True], ids=["vllm-order", "errors-first"])
def test_a_short_load_reports_the_same_failed_blocks_as_the_synchronous_path(
    tmp_path: Path, workers: list[KVaaSConnector], case: str, read_errors_first: bool
) -> None:
    """A chunk missing or not of this engine's shape ends request ``a``'s load there: the
    layer-wise worker reports the same failed blocks and loaded tokens in the same step as the
    synchronous one (also when the errors are read before ``wait_for_save``), and request
    ``b`` of the same step loads in full."""
    bad = {i: (_blob("int4", heads=HEADS + 1) if b == b"" else b) for i, b in BAD[case].items()}
    stored = _stored(tmp_path, "int4", bad)
    ranges = [(0, CHUNKS * CHUNK), (0, CHUNKS * CHUNK)]
    sync, sync_layers = _worker(stored, layerwise=False)
    lw, lw_layers = _worker(stored, layerwise=True)
    workers += [sync, lw]
    want = _step(sync, sync_layers, _tasks(stored, ranges))
    if read_errors_first:
        lw.bind_connector_metadata(KVaaSConnectorMetadata(loads=_tasks(stored, ranges)))
        lw.start_load_kv(None)  # type: ignore[arg-type]
        failed = lw.get_block_ids_with_load_errors()
        meta = lw.build_connector_worker_meta()
        lw.wait_for_save()
        lw.clear_connector_metadata()
        assert meta is None or isinstance(meta, KVaaSWorkerMetadata)
        got = Step(failed, meta, [])
    else:
        got = _step(lw, lw_layers, _tasks(stored, ranges))
    assert want.failed, "the synchronous path reports failed blocks"
    assert got.failed == want.failed
    assert got.meta is not None and want.meta is not None
    assert got.meta.short_loads == want.meta.short_loads and "a" in got.meta.short_loads
    for a, b in zip(lw_layers, sync_layers, strict=True):
        assert torch.equal(a, b)  # the chunks before the bad one, and all of b's, as loaded


def test_start_load_kv_returns_before_the_load_is_done(
    tmp_path: Path, workers: list[KVaaSConnector]
) -> None:
    """The fetch is held back until the step thread has returned from ``start_load_kv``: no
    layer is written then; once released, each wait returns with its layer in place."""
    stored = _stored(tmp_path, "int8")
    sync, sync_layers = _worker(stored, layerwise=False)
    lw, lw_layers = _worker(stored, layerwise=True)
    workers += [sync, lw]
    want = _step(sync, sync_layers, _tasks(stored, RANGES["whole"]))
    store = lw._store
    assert store is not None
    gate = threading.Event()
    real = store.get_prefix

    def held(*args: Any, **kwargs: Any) -> Any:
        gate.wait(timeout=10)
        return real(*args, **kwargs)

    store.get_prefix = held  # type: ignore[method-assign]
    t0 = time.monotonic()

    def check_nothing_written_yet() -> None:
        assert time.monotonic() - t0 < 5, "start_load_kv waited for the load"
        for t in lw_layers:
            assert torch.equal(t, torch.full_like(t, SENTINEL))
        gate.set()

    got = _step(lw, lw_layers, _tasks(stored, RANGES["whole"]), check_nothing_written_yet)
    for i in range(LAYERS):
        assert torch.equal(got.after_wait[i], want.after_wait[i])
    assert got.failed == set()


def test_the_setting_is_off_by_default_and_off_loads_before_returning(
    tmp_path: Path, workers: list[KVaaSConnector]
) -> None:
    """Off (the default): no background thread, ``start_load_kv`` has written every layer
    when it returns, and ``wait_for_layer_load`` returns at once."""
    assert Settings().connector_layerwise_loads is False
    assert "layerwise_loads" not in transfer_config({})["kv_connector_extra_config"]
    assert transfer_config({}, layerwise_loads=True)["kv_connector_extra_config"]["layerwise_loads"]
    stored = _stored(tmp_path, "int4")
    off, layers = _worker(stored, layerwise=None)
    workers.append(off)
    assert off._layerwise_loads is None
    written: list[bool] = []

    def all_written() -> None:
        written.extend(not torch.equal(t, torch.full_like(t, SENTINEL)) for t in layers)

    _step(off, layers, _tasks(stored, RANGES["whole"]), all_written)
    assert written == [True] * LAYERS


def test_the_loader_thread_runs_one_step_at_a_time_and_marks_every_layer() -> None:
    """``start`` waits for the previous step; ``wait_layer`` returns once its layer is marked;
    a job that raises still ends its step with every layer marked."""
    loads = LayerwiseLoads(3)
    try:
        gate = threading.Event()
        order: list[str] = []

        def job(mark: Callable[[int], None]) -> None:
            mark(0)
            gate.wait(timeout=10)
            order.append("job")
            mark(1)
            mark(2)

        loads.start(job)
        loads.wait_layer(0)  # returns while the job still holds layers 1 and 2
        assert loads.in_flight and order == []
        gate.set()
        loads.wait_layer(2)
        loads.finish()
        assert order == ["job"] and not loads.in_flight

        def failing(mark: Callable[[int], None]) -> None:
            raise RuntimeError("boom")

        loads.start(failing)
        for i in range(3):
            loads.wait_layer(i)
        loads.finish()
        loads.finish()  # nothing in flight: returns at once
        loads.wait_layer(1)
    finally:
        loads.close()


class _RecordingOrder:
    """The device-order calls as a GPU's would see them, recorded: which thread made each, and
    what the job had done when each fence was taken (a CUDA event covers exactly the work
    queued before it)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any, str]] = []
        self.done: list[str] = []  # the job's work so far
        self.inside = False  # the job runs in the side stream's context
        self._n = 0

    def started(self) -> Any:
        self.log.append(("started", "S", threading.current_thread().name))
        return "S"

    def running(self, after: Any) -> Any:
        order = self

        class _Ctx:
            def __enter__(self) -> None:
                order.log.append(("running", after, threading.current_thread().name))
                order.inside = True

            def __exit__(self, *exc: object) -> None:
                order.inside = False

        return _Ctx()

    def fence(self) -> Any:
        self._n += 1
        fence = (f"F{self._n}", tuple(self.done))
        self.log.append(("fence", fence, threading.current_thread().name))
        return fence

    def wait(self, fence: Any) -> None:
        self.log.append(("wait", fence, threading.current_thread().name))


def test_on_a_gpu_each_layer_is_waited_for_on_the_device_after_its_copy() -> None:
    """The protocol of :class:`~kvaas.connector.layerwise.CudaOrder`, with its calls recorded
    on CPU tensors: the job runs in the side stream's context after what the step thread had
    queued at the start; each layer's fence is taken after that layer's copy and before its
    mark; the step thread waits on the device for the fence of the layer it asked for, and for
    the job's end at ``finish``."""
    order = _RecordingOrder()
    loads = LayerwiseLoads(3, order=order)
    try:
        inside: list[bool] = []

        def job(mark: Callable[[int], None]) -> None:
            for i in range(3):
                inside.append(order.inside)
                order.done.append(f"copy {i}")
                mark(i)

        me = threading.current_thread().name
        loads.start(job)
        loads.wait_layer(1)
        loads.finish()
        assert inside == [True, True, True]
        assert order.log[0] == ("started", "S", me)
        assert order.log[1][:2] == ("running", "S") and order.log[1][2] != me
        fences = [f for kind, f, _ in order.log if kind == "fence"]
        # layer i's fence covers copies 0..i; the end fence covers them all
        assert [f[1] for f in fences] == [
            ("copy 0",),
            ("copy 0", "copy 1"),
            ("copy 0", "copy 1", "copy 2"),
            ("copy 0", "copy 1", "copy 2"),
        ]
        waits = [(f, t) for kind, f, t in order.log if kind == "wait"]
        assert waits == [(fences[1], me), (fences[3], me)]  # layer 1's, then the end's
    finally:
        loads.close()


def test_a_failed_job_leaves_every_unmarked_layer_behind_its_end() -> None:
    order = _RecordingOrder()
    loads = LayerwiseLoads(3, order=order)
    try:

        def failing(mark: Callable[[int], None]) -> None:
            order.done.append("copy 0")
            mark(0)
            raise RuntimeError("boom")

        loads.start(failing)
        for i in range(3):
            loads.wait_layer(i)
        loads.finish()
        waits = [f for kind, f, _ in order.log if kind == "wait"]
        assert waits[0][1] == ("copy 0",)  # layer 0: its own fence
        assert waits[1] == waits[2] == waits[3]  # layers 1 and 2, and the end: the end fence
    finally:
        loads.close()


def test_a_cpu_needs_no_device_order() -> None:
    assert isinstance(device_order(torch.device("cpu")), HostOrder)
    loads = LayerwiseLoads(1)
    try:
        assert isinstance(loads.order, HostOrder)
    finally:
        loads.close()
