"""Saves off the step thread: ``wait_for_save`` stages the completed chunks and returns; a
background thread encodes, seals and stores them (:mod:`kvaas.connector.saver`).

Real connectors on CPU tensors laid out like vLLM's paged KV (the CPU attention backend),
writing to a real disk tier that a second store instance reads, as the gateway would. The
background encoder is held at a barrier where a test must see the step return before it runs
(no timing is measured anywhere).
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from kvtest.vllm_config import connector_config, layer_names
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvaas import codec
from kvaas.connector import transfer_config
from kvaas.connector.connector import (
    KVaaSConnector,
    KVaaSConnectorMetadata,
    KVaaSWorkerMetadata,
    SaveTask,
    Sealing,
)
from kvaas.connector.paged import gather, slots
from kvaas.connector.params import TransferPlan
from kvaas.connector.saver import queue_bytes
from kvaas.store.crypto import TenantKeys
from kvaas.store.factory import StoreConfig, build_store
from kvaas.store.keys import ChunkKey
from kvaas.store.sync import SyncTieredStore

LAYERS, HEADS, DIM, BLOCK, CHUNK = 2, 2, 16, 16, 32
NUM_BLOCKS = 16
CHUNKS = 3
BLOCK_IDS = (9, 2, 14, 5, 0, 11)  # two blocks per chunk, out of order
NAMES = layer_names(LAYERS)
CHUNK_BYTES = LAYERS * 2 * CHUNK * HEADS * DIM * 4  # one staged float32 chunk
WAIT_S = 60.0  # a generous bound on waiting for an event that must come (not a measurement)


def _cfg(path: Path) -> StoreConfig:
    return StoreConfig(memory_bytes=0, disk_dir=path, disk_bytes=64 * 1024**2, redis_url=None)


def _vllm_config(path: Path, save_queue_bytes: int) -> Any:
    transfer = transfer_config(_cfg(path).to_dict())
    transfer["kv_connector_extra_config"]["save_queue_bytes"] = save_queue_bytes
    return connector_config(transfer, layers=LAYERS, heads=HEADS, dim=DIM, block=BLOCK)


def _worker(
    path: Path, save_queue_bytes: int, layers: list[torch.Tensor] | None = None
) -> tuple[KVaaSConnector, list[torch.Tensor]]:
    c = KVaaSConnector(_vllm_config(path, save_queue_bytes), KVConnectorRole.WORKER, None)  # type: ignore[arg-type]
    if layers is None:
        layers = [torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM) for _ in NAMES]
    c.register_kv_caches(dict(zip(NAMES, layers, strict=True)))
    return c, layers


def _step(c: KVaaSConnector, *saves: SaveTask) -> None:
    """One engine step's connector calls around the forward pass."""
    c.bind_connector_metadata(KVaaSConnectorMetadata(saves=list(saves)))
    try:
        c.start_load_kv(None)  # type: ignore[arg-type]
        c.wait_for_save()
    finally:
        c.clear_connector_metadata()


def _keys(n: int = CHUNKS) -> tuple[ChunkKey, ...]:
    return tuple(ChunkKey(os.urandom(32)) for _ in range(n))


def _task(
    keys: tuple[ChunkKey, ...], sealing: Sealing, req: str = "r", scheme: str = "int4"
) -> SaveTask:
    return SaveTask(req, keys, 0, CHUNK, scheme, "standard", BLOCK_IDS, sealing)


def _truth(c: KVaaSConnector) -> list[torch.Tensor]:
    """Each chunk's KV as it sits in the paged blocks now (``[L, 2, CHUNK, H, D]``)."""
    assert c._layout is not None
    out = []
    for i in range(CHUNKS):
        blk, off = slots(BLOCK_IDS, i * CHUNK, (i + 1) * CHUNK, c._layout)
        out.append(torch.stack([gather(v, blk, off) for v in c._kv_views]))
    return out


@pytest.fixture
def sealing() -> Sealing:
    return Sealing(TenantKeys("k1", {"k1": secrets.token_bytes(32)}), "fp", "int4")


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[SyncTieredStore]:
    with SyncTieredStore(build_store(_cfg(tmp_path))) as store:
        store.open()
        yield store


class Gate:
    """Holds the background encoder until :meth:`open`; counts the bytes it saw pending."""

    def __init__(self, c: KVaaSConnector) -> None:
        assert c._saver is not None
        self.saver = c._saver
        self.entered = threading.Event()
        self.released = threading.Event()
        self.max_pending = 0
        inner: Callable[[torch.Tensor, str], bytes] = self.saver._encode

        def encode(kv: torch.Tensor, scheme: str) -> bytes:
            self.max_pending = max(self.max_pending, self.saver.pending_bytes)
            self.entered.set()
            assert self.released.wait(WAIT_S), "the test never opened the gate"
            return inner(kv, scheme)

        self.saver._encode = encode

    def open(self) -> None:
        self.released.set()


@pytest.mark.parametrize("scheme", ["none", "lossless", "int8", "int4"])
def test_background_saves_are_bit_identical_to_synchronous_ones(
    tmp_path: Path, scheme: str
) -> None:
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    sync, layers = _worker(sync_dir, 0)
    background, _ = _worker(async_dir, 1 << 20, layers)  # the same paged KV
    assert background._saver is not None and background._saver.asynchronous
    keys = _keys()
    sealing = Sealing(TenantKeys("k1", {"k1": secrets.token_bytes(32)}), "fp", scheme)
    _step(sync, _task(keys, sealing, scheme=scheme))
    _step(background, _task(keys, sealing, scheme=scheme))
    background.shutdown()
    sync.shutdown()
    blobs = []
    for d in (sync_dir, async_dir):
        with SyncTieredStore(build_store(_cfg(d))) as store:
            store.open()
            blobs.append(store.get_prefix(list(keys), sealing.sealer()))
    assert len(blobs[0]) == CHUNKS
    assert blobs[0] == blobs[1]  # the same codec containers, byte for byte
    expected = [codec.encode(kv, scheme) for kv in _truth(sync)]
    assert blobs[0] == expected


def test_the_step_returns_before_encoding_and_the_blocks_are_free_at_once(
    tmp_path: Path, sealing: Sealing, reader: SyncTieredStore
) -> None:
    c, layers = _worker(tmp_path, 1 << 20)
    gate = Gate(c)
    truth = _truth(c)
    keys = _keys()
    _step(c, _task(keys, sealing))  # returns while the encoder is held
    assert gate.entered.wait(WAIT_S)
    assert reader.exists_many(list(keys)) == [False] * CHUNKS
    assert c.build_connector_worker_meta() is None  # nothing stored, nothing to report
    for layer in layers:  # the engine reuses the blocks at once
        layer.fill_(-1.0)
    gate.open()
    assert c._saver is not None
    c._saver.drain()
    meta = c.build_connector_worker_meta()
    assert isinstance(meta, KVaaSWorkerMetadata)
    assert meta.saved == {"r": {0: CHUNKS}} and not meta.save_failed
    stored = reader.get_prefix(list(keys), sealing.sealer())
    assert stored == [codec.encode(kv, "int4") for kv in truth]  # the step's KV, not the -1s
    c.shutdown()


def _request(plan: TransferPlan, rid: str) -> Any:
    return SimpleNamespace(
        request_id=rid, kv_transfer_params=plan.to_params(), prompt_token_ids=[1] * CHUNK * CHUNKS
    )


def _schedule(s: KVaaSConnector, req: Any) -> SaveTask:
    """The scheduler side: the request arrives and its whole prompt runs in one step."""
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    new = SimpleNamespace(
        req_id=req.request_id, block_ids=(list(BLOCK_IDS),), num_computed_tokens=0
    )
    cached = SimpleNamespace(
        req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[]
    )
    out = SimpleNamespace(
        scheduled_new_reqs=[new],
        scheduled_cached_reqs=cached,
        num_scheduled_tokens={req.request_id: CHUNK * CHUNKS},
    )
    meta = s.build_connector_meta(out)  # type: ignore[arg-type]
    assert isinstance(meta, KVaaSConnectorMetadata) and len(meta.saves) == 1
    return meta.saves[0]


def _report(s: KVaaSConnector, req: Any) -> dict[str, Any]:
    _, params = s.request_finished(req, list(BLOCK_IDS))
    assert params is not None
    return dict(params["kvaas"])


def test_a_finished_request_claims_only_the_chunks_stored(tmp_path: Path, sealing: Sealing) -> None:
    """vLLM emits a request's output in the step it stops, before queued saves land: the
    report says which chunks are stored and which are still pending."""
    s = KVaaSConnector(_vllm_config(tmp_path, 1 << 20), KVConnectorRole.SCHEDULER, None)  # type: ignore[arg-type]
    w, _ = _worker(tmp_path, 1 << 20)
    gate = Gate(w)
    plan = TransferPlan("save", _keys(), CHUNK, scheme="int4", fingerprint="fp", seal=sealing.keys)
    early, late = _request(plan, "early"), _request(plan, "late")

    _step(w, _schedule(s, late))
    assert gate.entered.wait(WAIT_S)
    s.update_connector_output(
        SimpleNamespace(kv_connector_worker_meta=w.build_connector_worker_meta())
    )
    assert _report(s, late) == {"matched_tokens": 0, "saved_chunks": 0, "pending_chunks": CHUNKS}

    gate.open()
    assert w._saver is not None
    w._saver.drain()
    _step(w, _schedule(s, early))  # the same keys again (stored: the tiers skip them)
    w._saver.drain()
    s.update_connector_output(
        SimpleNamespace(kv_connector_worker_meta=w.build_connector_worker_meta())
    )
    assert _report(s, early) == {"matched_tokens": 0, "saved_chunks": CHUNKS, "pending_chunks": 0}
    w.shutdown()
    s.shutdown()


def test_a_store_write_failing_in_the_background_is_a_failed_save(
    tmp_path: Path, sealing: Sealing, reader: SyncTieredStore
) -> None:
    """A real write failure (a file where chunk 1's directory must go) is logged, leaves the
    chunks from it on missing, as a failed synchronous save did, and is reported."""
    s = KVaaSConnector(_vllm_config(tmp_path, 1 << 20), KVConnectorRole.SCHEDULER, None)  # type: ignore[arg-type]
    w, _ = _worker(tmp_path, 1 << 20)
    keys = _keys()
    disk = reader.store.tier("disk")
    blocker = disk.path_of(keys[1]).parent  # a file where chunk 1's directory must go
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")
    plan = TransferPlan("save", keys, CHUNK, scheme="int4", fingerprint="fp", seal=sealing.keys)
    req = _request(plan, "doomed")
    _step(w, _schedule(s, req))
    assert w._saver is not None
    w._saver.drain()
    meta = w.build_connector_worker_meta()
    assert isinstance(meta, KVaaSWorkerMetadata) and meta.save_failed == {"doomed"}
    assert "doomed" not in meta.saved
    assert reader.exists_many(list(keys))[1:] == [False, False]
    s.update_connector_output(SimpleNamespace(kv_connector_worker_meta=meta))
    assert _report(s, req) == {
        "matched_tokens": 0,
        "saved_chunks": 0,
        "pending_chunks": 0,
        "save_failed": True,
    }
    w.shutdown()
    s.shutdown()


def test_shutdown_stores_every_queued_save(
    tmp_path: Path, sealing: Sealing, reader: SyncTieredStore
) -> None:
    c, _ = _worker(tmp_path, 1 << 20)
    gate = Gate(c)
    requests = [_keys() for _ in range(3)]
    for i, keys in enumerate(requests):
        _step(c, _task(keys, sealing, req=f"r{i}"))
    assert gate.entered.wait(WAIT_S)
    done = threading.Event()
    closer = threading.Thread(target=lambda: (c.shutdown(), done.set()))
    closer.start()
    assert not done.is_set()  # the encoder is held: shutdown cannot have drained
    gate.open()
    closer.join(WAIT_S)
    assert done.is_set()
    for keys in requests:
        assert reader.exists_many(list(keys)) == [True] * CHUNKS


def test_a_full_queue_makes_the_step_wait_and_never_exceeds_its_bound(
    tmp_path: Path, sealing: Sealing, reader: SyncTieredStore
) -> None:
    bound = CHUNK_BYTES * CHUNKS + CHUNK_BYTES // 2  # one step's chunks fit, two do not
    c, _ = _worker(tmp_path, bound)
    gate = Gate(c)
    first, second = _keys(), _keys()
    _step(c, _task(first, sealing, req="a"))  # admitted: the queue was empty
    assert gate.entered.wait(WAIT_S)
    returned = threading.Event()
    stepper = threading.Thread(
        target=lambda: (_step(c, _task(second, sealing, req="b")), returned.set())
    )
    stepper.start()
    assert c._saver is not None
    assert c._saver.waiting_for_room.wait(WAIT_S)  # the second step waits for room
    assert not returned.is_set()
    assert c._saver.pending_bytes == CHUNK_BYTES * CHUNKS <= bound
    gate.open()
    stepper.join(WAIT_S)
    assert returned.is_set()
    c.shutdown()
    assert gate.max_pending <= bound
    assert reader.exists_many([*first, *second]) == [True] * 2 * CHUNKS


def test_the_queue_bound_comes_from_the_transfer_config_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KVAAS_SAVE_QUEUE_BYTES", raising=False)
    assert queue_bytes({"save_queue_bytes": 123}) == 123
    monkeypatch.setenv("KVAAS_SAVE_QUEUE_BYTES", "456")
    assert queue_bytes({"store": {}}) == 456
    assert queue_bytes({"save_queue_bytes": 0}) == 0
    with pytest.raises(ValueError):
        queue_bytes({"save_queue_bytes": -1})
