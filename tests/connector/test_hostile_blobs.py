"""Hostile chunks through the connector's load path: a blob that authenticates (sealed with the
tenant's key) but whose plaintext is malformed, of another shape, truncated or with a header
claiming huge dimensions never raises out of the worker, never touches KV outside the chunks it
was meant for, and is reported as a failed load (with every chunk after it) for vLLM to
recompute.

The worker is a real :class:`KVaaSConnector` on CPU tensors laid out like vLLM's paged KV
(the CPU attention backend's layout), reading from a disk tier that another store instance
writes, as a gateway or another node would.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvtest.vllm_config import connector_config

from kvaas import codec
from kvaas.codec.container import CHECKSUM_SIZE, DTYPE_IDS, pack
from kvaas.connector import transfer_config
from kvaas.connector.connector import (
    KVaaSConnector,
    KVaaSConnectorMetadata,
    KVaaSWorkerMetadata,
    LoadTask,
    Sealing,
)
from kvaas.connector.paged import PagedLayout, gather, slots
from kvaas.store.crypto import TenantKeys
from kvaas.store.factory import StoreConfig, build_store
from kvaas.store.keys import ChunkKey
from kvaas.store.sync import SyncTieredStore

LAYERS, HEADS, DIM, BLOCK, CHUNK = 2, 2, 16, 16, 32
NUM_BLOCKS = 12
CHUNKS = 3
# the request's blocks (two per chunk), scattered among blocks of other requests
BLOCK_IDS = (1, 3, 4, 6, 8, 10)
SENTINEL = 7.0
SHAPE = (LAYERS, 2, CHUNK, HEADS, DIM)
SCHEMES = ["none", "lossless", "int8", "int4"]


@dataclass
class Worker:
    connector: KVaaSConnector
    writer: SyncTieredStore
    sealing: Sealing
    layers: list[torch.Tensor]
    layout: PagedLayout


def _vllm_config(store: dict[str, Any]) -> Any:
    """The parts of ``VllmConfig`` the connector reads."""
    return connector_config(
        transfer_config(store), layers=LAYERS, heads=HEADS, dim=DIM, block=BLOCK
    )


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    disk = Path(tmp_path_factory.mktemp("chunks"))
    cfg = StoreConfig(memory_bytes=0, disk_dir=disk, disk_bytes=256 * 1024**2, redis_url=None)
    connector = KVaaSConnector(_vllm_config(cfg.to_dict()), KVConnectorRole.WORKER, None)  # type: ignore[arg-type]
    layers = {
        f"model.layers.{i}.self_attn.attn": torch.full(
            (NUM_BLOCKS, HEADS, BLOCK, 2 * DIM), SENTINEL
        )
        for i in range(LAYERS)
    }
    connector.register_kv_caches(layers)
    keys = TenantKeys("k1", {"k1": secrets.token_bytes(32)})
    with SyncTieredStore(build_store(cfg)) as writer:
        writer.open()
        yield Worker(
            connector,
            writer,
            Sealing(keys, "fingerprint", "none"),
            list(layers.values()),
            PagedLayout.for_backend(
                "CPU_ATTN", layers["model.layers.0.self_attn.attn"], BLOCK, HEADS, DIM
            ),
        )
    connector.shutdown()


def _good(seed: int, scheme: str = "none") -> bytes:
    g = torch.Generator().manual_seed(seed)
    return codec.encode(torch.randn(SHAPE, generator=g), scheme)


def _fits(blob: bytes) -> torch.Tensor | None:
    """What the worker should load from ``blob``: its decoded KV when it decodes to the
    destination's shape and dtype, else ``None`` (a failed load)."""
    try:
        codec.verify_blob(blob)
        kv = codec.decode(blob)
    except codec.CodecError:
        return None
    return kv if kv.shape == SHAPE and kv.dtype == torch.float32 else None


def _load(w: Worker, blobs: list[bytes]) -> tuple[set[int], dict[str, int], str]:
    """Store ``blobs`` under fresh keys and have the worker load them into ``BLOCK_IDS``: the
    blocks reported failed, the short loads reported to the scheduler, the request id."""
    for layer in w.layers:
        layer.fill_(SENTINEL)
    keys = tuple(ChunkKey(os.urandom(32)) for _ in blobs)
    w.writer.put_chunks(list(zip(keys, blobs, strict=True)), "standard", w.sealing.sealer())
    req = f"req-{secrets.token_hex(4)}"
    task = LoadTask(req, keys, CHUNK, 0, CHUNKS * CHUNK, BLOCK_IDS, w.sealing)
    w.connector.bind_connector_metadata(KVaaSConnectorMetadata(loads=[task]))
    try:
        w.connector.start_load_kv(None)  # type: ignore[arg-type]
    finally:
        w.connector.clear_connector_metadata()
    failed = w.connector.get_block_ids_with_load_errors()
    meta = w.connector.build_connector_worker_meta()
    short = meta.short_loads if isinstance(meta, KVaaSWorkerMetadata) else {}
    return failed, short, req


def _check(w: Worker, blobs: list[bytes]) -> None:
    expected: list[torch.Tensor] = []
    for b in blobs:
        kv = _fits(b)
        if kv is None:
            break
        expected.append(kv)
    failed, short, req = _load(w, blobs)
    n = len(expected)
    blocks_per_chunk = CHUNK // BLOCK
    assert failed == set(BLOCK_IDS[n * blocks_per_chunk :])
    assert short == ({} if n == CHUNKS else {req: n * CHUNK})
    for i, kv in enumerate(expected):  # loaded chunks hold exactly the decoded KV, bit for
        blk, off = slots(BLOCK_IDS, i * CHUNK, (i + 1) * CHUNK, w.layout)  # bit (a fuzzed
        for li, layer in enumerate(w.layers):  # payload may hold NaNs, never equal as values)
            got = gather(w.layout.keys_values(layer), blk, off)
            assert torch.equal(got.view(torch.int32), kv[li].view(torch.int32))
    loaded = set(BLOCK_IDS[: n * blocks_per_chunk])
    for layer in w.layers:  # everything else, failed blocks included, is untouched
        for b in range(NUM_BLOCKS):
            if b not in loaded:
                assert torch.all(layer[b] == SENTINEL), f"block {b} was written"


def _reseal_checksum(body: bytes) -> bytes:
    """``body`` (a blob without its checksum) with a valid checksum appended."""
    return body + xxhash.xxh3_64_digest(body)


def _mismatched(what: str, scheme: str) -> bytes:
    L, _, T, H, D = SHAPE
    shape = {
        "layers+": (L + 1, 2, T, H, D),
        "layers-": (L - 1, 2, T, H, D),
        "tokens+": (L, 2, T + BLOCK, H, D),
        "tokens-": (L, 2, T - BLOCK, H, D),
        "heads": (L, 2, T, H + 1, D),
        "dim": (L, 2, T, H, D * 2),
    }.get(what, SHAPE)
    dtype = torch.bfloat16 if what == "dtype" else torch.float32
    return codec.encode(torch.randn(shape).to(dtype), scheme)


def test_good_chunks_load(worker: Worker) -> None:
    _check(worker, [_good(i, s) for i, s in enumerate(SCHEMES[:CHUNKS])])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    "what", ["layers+", "layers-", "tokens+", "tokens-", "heads", "dim", "dtype"]
)
@pytest.mark.parametrize("at", range(CHUNKS))
def test_chunk_of_another_shape_is_a_failed_load(
    worker: Worker, what: str, scheme: str, at: int
) -> None:
    blobs = [_good(i) for i in range(CHUNKS)]
    blobs[at] = _mismatched(what, scheme)
    failed, short, req = _load(worker, blobs)
    assert failed == set(BLOCK_IDS[at * 2 :])
    assert short == {req: at * CHUNK}


def test_header_claiming_huge_dimensions_is_a_failed_load(worker: Worker) -> None:
    payload = bytes(64)
    for scheme_id, params in ((0, {}), (1, {"planes": [32, 32]}), (3, {"gk": 64, "gv": 64})):
        huge = pack(
            scheme_id, torch.Size((65535, 2, 2**32 - 1, 65535, 65535)), torch.float32, params,
            payload,
        )  # fmt: skip
        _check(worker, [_good(0), huge, _good(2)])


def _hostile() -> st.SearchStrategy[bytes]:
    good = st.builds(_good, st.integers(0, 3), st.sampled_from(SCHEMES))

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        blob = bytearray(draw(good)[:-CHECKSUM_SIZE])
        for _ in range(draw(st.integers(1, 8))):
            # mostly the header and scheme parameters, sometimes the payload
            hi = draw(st.sampled_from([40, 80, len(blob)]))
            blob[draw(st.integers(0, min(hi, len(blob)) - 1))] = draw(st.integers(0, 255))
        return _reseal_checksum(bytes(blob))

    @st.composite
    def headers(draw: st.DrawFn) -> bytes:
        dims = st.integers(1, 2**16 - 1)
        shape = torch.Size((draw(dims), 2, draw(st.integers(1, 2**32 - 1)), draw(dims), draw(dims)))
        params = draw(
            st.sampled_from(
                [{}, {"planes": [8, 8, 8, 8]}, {"planes": [-4, -4, -4, -4]},
                 {"gk": 1, "gv": 1, "sd": "f16"}, {"gk": 2**40, "gv": 16, "sd": "f32"}]
            )
        )  # fmt: skip
        dtype = draw(st.sampled_from(list(DTYPE_IDS)))
        return pack(draw(st.integers(0, 4)), shape, dtype, params, draw(st.binary(max_size=256)))

    @st.composite
    def truncated(draw: st.DrawFn) -> bytes:
        blob = draw(good)
        return blob[: draw(st.integers(0, len(blob) - 1))]

    return st.one_of(
        mutated(),
        headers(),
        truncated(),
        st.builds(_mismatched, st.sampled_from(["layers+", "tokens-", "heads", "dim", "dtype"]),
                  st.sampled_from(SCHEMES)),
        st.binary(max_size=512),
    )  # fmt: skip


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(hostile=_hostile(), at=st.integers(0, CHUNKS - 1))
def test_fuzzed_chunks_never_escape_the_load(worker: Worker, hostile: bytes, at: int) -> None:
    blobs = [_good(i) for i in range(CHUNKS)]
    blobs[at] = hostile
    _check(worker, blobs)
