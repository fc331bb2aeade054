"""The worker's pre-decoded memory tier (:mod:`kvaas.connector.decoded`).

The LRU's budget and eviction, its thread safety, the background promoter, and loads through a
real :class:`KVaaSConnector` on a real disk store into CPU tensors laid out as vLLM's CPU
backend makes them: a load served from the decoded tier writes exactly the bytes that decoding
the stored blobs writes, on every scheme, and reports its hits as ``decoded``.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from kvtest.vllm_config import connector_config, layer_names
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvaas import codec
from kvaas.connector import transfer_config
from kvaas.connector.chunks import ChunkShape
from kvaas.connector.connector import (
    KVaaSConnector,
    KVaaSConnectorMetadata,
    KVaaSWorkerMetadata,
    LoadTask,
    Sealing,
)
from kvaas.connector.decoded import (
    DECODED_BYTES_ENV,
    DEFAULT_DECODED_BYTES,
    DecodedChunk,
    DecodedChunks,
    Promoter,
    decode_chunk,
    decoded_bytes,
)
from kvaas.connector.params import TransferPlan
from kvaas.store.crypto import TenantKeys
from kvaas.store.factory import StoreConfig
from kvaas.store.keys import ChunkKey
from kvaas.store.sync import SyncTieredStore

LAYERS, HEADS, DIM, BLOCK, CHUNK, CHUNKS = 2, 2, 16, 16, 32, 3
NAMES = layer_names(LAYERS)
NUM_BLOCKS = 12
BLOCKS = (5, 0, 9, 2, 7, 11)  # the request's blocks, out of order
SENTINEL = 7.0


def _key() -> ChunkKey:
    return ChunkKey(os.urandom(32))


def _chunk(nbytes_each: int = 64) -> DecodedChunk:
    """A decoded chunk of ``2 * nbytes_each`` bytes (float32 keys and values)."""
    n = nbytes_each // 4
    return DecodedChunk(torch.randn(1, 1, n, 1), torch.randn(1, n, 1, 1))


# ------------------------------------------------------------------ the LRU
def test_lru_keeps_its_budget_and_evicts_the_least_recently_used() -> None:
    tier = DecodedChunks(3 * 128)
    a, b, c, d = (_key() for _ in range(4))
    for k in (a, b, c):
        assert tier.put(k, _chunk())
    assert tier.bytes == 3 * 128 and len(tier) == 3
    assert tier.get(a) is not None  # a is now the most recently used: b goes first
    assert tier.put(d, _chunk())
    assert b not in tier and a in tier and c in tier and d in tier
    assert tier.bytes == 3 * 128
    tier.put(d, _chunk(128))  # a replacement counts its new size only; c is the oldest now
    assert tier.bytes == 128 + 256 and c not in tier and a in tier and d in tier
    assert not tier.put(_key(), _chunk(1024)) and tier.bytes <= tier.budget_bytes  # too big
    tier.clear()
    assert tier.bytes == 0 and len(tier) == 0 and tier.get(a) is None


def test_prefix_is_the_leading_run_of_fitting_chunks() -> None:
    tier = DecodedChunks(1 << 20)
    shape = ChunkShape(1, 16, 1, 1, torch.float32)
    keys = [_key() for _ in range(4)]
    for k in keys[:2]:
        tier.put(k, _chunk())
    tier.put(keys[3], _chunk())
    assert len(tier.prefix(keys, shape)) == 2  # stops at the first key not held
    other = ChunkShape(1, 16, 1, 1, torch.bfloat16)
    assert tier.prefix(keys, other) == []  # never served for another dtype or shape
    assert tier.prefix(keys[2:], shape) == []


def test_concurrent_puts_and_gets_keep_the_books_straight() -> None:
    tier = DecodedChunks(20 * 128)
    keys = [_key() for _ in range(60)]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(2000):
                k = rng.choice(keys)
                if rng.random() < 0.5:
                    tier.put(k, _chunk())
                else:
                    tier.get(k)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    held = [k for k in keys if k in tier]
    assert tier.bytes == sum(c.nbytes for k in held if (c := tier.get(k)) is not None)
    assert tier.bytes <= tier.budget_bytes and len(tier) == len(held) == 20


def test_the_budget_comes_from_the_extra_config_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(DECODED_BYTES_ENV, raising=False)
    assert decoded_bytes({}) == DEFAULT_DECODED_BYTES
    monkeypatch.setenv(DECODED_BYTES_ENV, "0")
    assert decoded_bytes(None) == 0
    assert decoded_bytes({"decoded_bytes": 1234}) == 1234
    with pytest.raises(ValueError, match="decoded_bytes"):
        decoded_bytes({"decoded_bytes": -1})
    with pytest.raises(ValueError, match="decoded_bytes"):
        decoded_bytes({"decoded_bytes": "lots"})


# ------------------------------------------------------------------ the promoter
SHAPE = ChunkShape(LAYERS, CHUNK, HEADS, DIM, torch.float32)


def _blob(scheme: str = "int4", dtype: torch.dtype = torch.float32) -> bytes:
    return codec.encode(torch.randn(LAYERS, 2, CHUNK, HEADS, DIM).to(dtype), scheme)


def test_the_promoter_decodes_in_the_background_what_decode_returns() -> None:
    tier = DecodedChunks(1 << 20)
    promoter = Promoter(tier, torch.device("cpu"))
    try:
        good, other = _blob(), _blob(dtype=torch.bfloat16)
        keys = [_key() for _ in range(3)]
        queued = promoter.submit(list(zip(keys, [good, other, b"not a blob"], strict=True)), SHAPE)
        assert queued == 3
        assert promoter.drain(timeout=30)
        assert keys[1] not in tier and keys[2] not in tier  # refused: not of this shape
        chunk = tier.get(keys[0])
        assert chunk is not None
        kv = codec.decode(good)
        assert torch.equal(chunk.keys, kv[:, 0].transpose(1, 2))
        assert torch.equal(chunk.values, kv[:, 1])
        assert promoter.submit([(keys[0], good)], SHAPE) == 0  # held already
    finally:
        promoter.close()


def test_the_promoter_drops_what_its_queue_cannot_hold() -> None:
    blob = _blob("none")
    tier = DecodedChunks(1 << 20)
    promoter = Promoter(tier, torch.device("cpu"), pending_bytes=len(blob) * 2)
    promoter.close()  # stopped: nothing is decoded, so the queue is what is measured
    assert promoter.submit([(_key(), blob)], SHAPE) == 0
    promoter = Promoter(tier, torch.device("cpu"), pending_bytes=len(blob) * 2)
    with promoter._cv:  # the thread cannot take anything off the queue meanwhile
        items = [(_key(), blob) for _ in range(5)]
        assert promoter.submit(items, SHAPE) == 2
        assert promoter.dropped == 3
    promoter.close()


def test_decode_chunk_never_raises_for_a_bad_blob() -> None:
    bad = bytearray(_blob())
    bad[28:30] = b"{]"
    assert decode_chunk(bytes(bad), SHAPE, torch.device("cpu")) is None
    assert decode_chunk(b"", SHAPE, torch.device("cpu")) is None


# ------------------------------------------------------------------ loads through the connector
@dataclass
class Rig:
    connector: KVaaSConnector
    layers: list[torch.Tensor]
    sealing: Sealing
    keys: tuple[ChunkKey, ...]
    seal: TenantKeys


def _store_cfg(path: Path) -> StoreConfig:
    return StoreConfig(memory_bytes=0, disk_dir=path, disk_bytes=64 << 20, redis_url=None)


def _rig(
    path: Path, scheme: str, dtype: torch.dtype, decoded: int = 16 << 20, tail: int = 0
) -> Rig:
    """Chunks stored for a worker: ``CHUNKS`` full ones, the last partial (``tail`` tokens)
    when ``tail`` is above 0."""
    seal = TenantKeys("k1", {"k1": secrets.token_bytes(32)})
    sealing = Sealing(seal, "fp", scheme)
    keys = tuple(_key() for _ in range(CHUNKS))
    n = CHUNKS * CHUNK - (CHUNK - tail if tail else 0)
    kv = torch.randn(LAYERS, 2, n, HEADS, DIM).to(dtype)
    blobs = [codec.encode(kv[:, :, i * CHUNK : min(n, (i + 1) * CHUNK)].contiguous(), scheme)
             for i in range(CHUNKS)]  # fmt: skip
    with SyncTieredStore.from_config(_store_cfg(path)) as store:
        store.put_chunks(list(zip(keys, blobs, strict=True)), "standard", sealing.sealer())
    transfer = transfer_config(_store_cfg(path).to_dict(), decoded_bytes=decoded)
    cfg = connector_config(transfer, layers=LAYERS, heads=HEADS, dim=DIM, block=BLOCK)
    worker = KVaaSConnector(cfg, KVConnectorRole.WORKER, None)  # type: ignore[arg-type]
    # the CPU backend's layer tensors: [blocks, kv_heads, block_size, 2 * head_dim]
    layers = [torch.full((NUM_BLOCKS, HEADS, BLOCK, 2 * DIM), SENTINEL, dtype=dtype) for _ in NAMES]
    worker.register_kv_caches(dict(zip(NAMES, layers, strict=True)))
    return Rig(worker, layers, sealing, keys, seal)


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for r in made:
        r.connector.shutdown()


def _load(rig: Rig, rid: str, start: int, end: int, tail: int = 0) -> KVaaSWorkerMetadata:
    task = LoadTask(rid, rig.keys, CHUNK, start, end, BLOCKS, rig.sealing, tail)
    rig.connector.bind_connector_metadata(KVaaSConnectorMetadata(loads=[task]))
    try:
        rig.connector.start_load_kv(None)  # type: ignore[arg-type]
    finally:
        rig.connector.clear_connector_metadata()
    assert rig.connector.get_block_ids_with_load_errors() == set()
    meta = rig.connector.build_connector_worker_meta()
    assert isinstance(meta, KVaaSWorkerMetadata)
    return meta


def _drain(rig: Rig) -> None:
    """Wait for the promoter, then spoil the loader's reused staging buffers (as a load of
    other chunks would), so the next load cannot pass on what the last one left there."""
    assert rig.connector._promoter is not None and rig.connector._loader is not None
    assert rig.connector._promoter.drain(timeout=30)
    rig.connector._loader._keys.fill_(-SENTINEL)
    rig.connector._loader._values.fill_(-SENTINEL)


@pytest.mark.parametrize("scheme", ["none", "lossless", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    ("start", "end"),
    [(0, CHUNKS * CHUNK), (BLOCK, CHUNKS * CHUNK - BLOCK), (CHUNK + 3, 2 * CHUNK + 5)],
    ids=["whole", "from-block-1", "ragged"],
)
def test_a_load_from_the_decoded_tier_writes_what_decoding_the_blobs_writes(
    tmp_path: Path, rigs: list[Rig], scheme: str, dtype: torch.dtype, start: int, end: int
) -> None:
    """The first load decodes the stored blobs (and promotes them in the background); the
    second, into the same blocks reset to a sentinel, is served from the decoded tier: every
    byte of the cache is the same either way, and the reports say which tier served it."""
    rig = _rig(tmp_path, scheme, dtype)
    rigs.append(rig)
    first = _load(rig, "a", start, end)
    assert first.decoded_tokens["a"] == 0 and "decoded" not in first.load_ms["a"]
    want = [t.clone() for t in rig.layers]
    _drain(rig)
    chunks = -(-end // CHUNK) - start // CHUNK
    assert rig.connector._decoded is not None and len(rig.connector._decoded) == chunks
    for t in rig.layers:
        t.fill_(SENTINEL)
    second = _load(rig, "b", start, end)
    assert second.decoded_tokens["b"] == chunks * CHUNK
    assert second.memory_tokens["b"] == chunks * CHUNK  # the in-process tiers, decoded included
    assert "decoded" in second.load_ms["b"] and "store" not in second.load_ms["b"]
    for got, exp in zip(rig.layers, want, strict=True):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
def test_decoded_chunks_then_blobs_in_one_load_are_bit_exact(
    tmp_path: Path, rigs: list[Rig], scheme: str
) -> None:
    """Only the first chunk is in the decoded tier: the load copies it and fetches and decodes
    the rest from the store, writing the same bytes as a load of all the blobs."""
    rig = _rig(tmp_path, scheme, torch.float32)
    rigs.append(rig)
    n = CHUNKS * CHUNK
    _load(rig, "a", 0, n)
    want = [t.clone() for t in rig.layers]
    _drain(rig)
    tier = rig.connector._decoded
    assert tier is not None
    head = tier.get(rig.keys[0])
    assert head is not None
    tier.clear()
    tier.put(rig.keys[0], head)
    for t in rig.layers:
        t.fill_(SENTINEL)
    meta = _load(rig, "b", 0, n)
    assert meta.decoded_tokens["b"] == CHUNK and "store" in meta.load_ms["b"]
    for got, exp in zip(rig.layers, want, strict=True):
        assert torch.equal(got, exp)
    _drain(rig)  # the blobs fetched are promoted too
    assert all(k in tier for k in rig.keys)


def test_the_scheduler_report_counts_decoded_tokens(tmp_path: Path, rigs: list[Rig]) -> None:
    """The worker's decoded hits reach the request's ``kvaas`` report (``decoded_tokens``,
    and within ``memory_tokens``) through a real scheduler-side connector."""
    rig = _rig(tmp_path, "int4", torch.float32)
    rigs.append(rig)
    transfer = transfer_config(_store_cfg(tmp_path).to_dict())
    cfg = connector_config(transfer, layers=LAYERS, heads=HEADS, dim=DIM, block=BLOCK)
    sched = KVaaSConnector(cfg, KVConnectorRole.SCHEDULER, None)  # type: ignore[arg-type]
    plan = TransferPlan("load", rig.keys, CHUNK, "int4", fingerprint="fp", seal=rig.seal)
    try:
        reports: list[dict[str, Any]] = []
        for rid in ("first", "second"):
            req = SimpleNamespace(
                request_id=rid,
                kv_transfer_params=plan.to_params(),
                prompt_token_ids=list(range(CHUNKS * CHUNK + 3)),
            )
            sched.get_num_new_matched_tokens(req, 0)  # type: ignore[arg-type]
            meta = _load(rig, rid, 0, CHUNKS * CHUNK)
            _drain(rig)
            sched.update_connector_output(SimpleNamespace(kv_connector_worker_meta=meta))
            _, params = sched.request_finished(req, list(BLOCKS))  # type: ignore[arg-type]
            assert params is not None
            reports.append(params["kvaas"])
        assert [r["decoded_tokens"] for r in reports] == [0, CHUNKS * CHUNK]
        assert [r["memory_tokens"] for r in reports] == [0, CHUNKS * CHUNK]
    finally:
        sched.shutdown()


def test_the_tier_is_off_at_zero_and_cleared_at_shutdown(tmp_path: Path) -> None:
    off = _rig(tmp_path / "off", "int4", torch.float32, decoded=0)
    try:
        assert off.connector._decoded is None and off.connector._promoter is None
        meta = _load(off, "a", 0, CHUNKS * CHUNK)
        assert meta.decoded_tokens["a"] == 0
    finally:
        off.connector.shutdown()
    on = _rig(tmp_path / "on", "int4", torch.float32)
    _load(on, "a", 0, CHUNKS * CHUNK)
    _drain(on)
    tier = on.connector._decoded
    assert tier is not None and len(tier) == CHUNKS
    on.connector.shutdown()
    assert len(tier) == 0 and tier.bytes == 0


@pytest.mark.parametrize("scheme", ["none", "int4"])
def test_a_partial_last_chunk_is_promoted_and_served_from_the_decoded_tier(
    tmp_path: Path, rigs: list[Rig], scheme: str
) -> None:
    """The prompt's partial last chunk is promoted with its own shape: the second load of a
    cache whose last chunk holds ``tail`` tokens comes from the decoded tier whole, and every
    byte equals the first load's (decoded from the blobs)."""
    tail = BLOCK + BLOCK // 2
    n = (CHUNKS - 1) * CHUNK + tail
    end = n // BLOCK * BLOCK  # the scheduler's block-aligned match
    rig = _rig(tmp_path, scheme, torch.float32, tail=tail)
    rigs.append(rig)
    first = _load(rig, "a", 0, end, tail)
    assert first.decoded_tokens["a"] == 0
    want = [t.clone() for t in rig.layers]
    _drain(rig)
    assert rig.connector._decoded is not None and len(rig.connector._decoded) == CHUNKS
    for t in rig.layers:
        t.fill_(SENTINEL)
    second = _load(rig, "b", 0, end, tail)
    assert second.decoded_tokens["b"] == n  # the partial chunk counted at its length
    assert "store" not in second.load_ms["b"]
    for got, exp in zip(rig.layers, want, strict=True):
        assert torch.equal(got, exp)
    # the same keys loaded as if the last were full: the decoded tier does not serve it
    for t in rig.layers:
        t.fill_(SENTINEL)
    rig.connector.bind_connector_metadata(
        KVaaSConnectorMetadata(loads=[LoadTask("c", rig.keys, CHUNK, 0, end, BLOCKS, rig.sealing)])
    )
    try:
        rig.connector.start_load_kv(None)  # type: ignore[arg-type]
    finally:
        rig.connector.clear_connector_metadata()
    failed = rig.connector.get_block_ids_with_load_errors()
    assert failed == set(BLOCKS[(CHUNKS - 1) * CHUNK // BLOCK : end // BLOCK])
