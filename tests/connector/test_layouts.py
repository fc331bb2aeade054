"""The connector's paged copies on every KV layout vLLM 0.32's attention backends make.

Each layer tensor is built the way vLLM's GPU and CPU model runners build it (one int8 buffer,
``create_kv_cache_views`` with a ``KVCacheLayout`` and, where the backend splits blocks, a
kernel block size), on CPU. What a token's key and value are is read through the backend's own
indexing (the CPU backend's ``[2 * block, head_dim]`` rows view; the GPU backends'
``transpose(1, 2).split(head_size, dim=-1)``), never through the connector's code: a save from
some blocks then a load into others through a real :class:`KVaaSConnector` must put back
exactly the keys and values the backend would read, store the same canonical blob whatever the
layout, and leave every other block's bytes alone.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, create_kv_cache_views
from vllm.v1.kv_cache_layout import KVCacheLayout

from kvaas import codec
from kvaas.connector import transfer_config
from kvaas.connector.chunks import ChunkShape
from kvaas.connector.connector import (
    KVaaSConnector,
    KVaaSConnectorMetadata,
    LoadTask,
    SaveTask,
    Sealing,
)
from kvaas.connector.paged import LayoutError, scatter, slots
from kvaas.store.crypto import TenantKeys
from kvaas.store.factory import StoreConfig, build_store
from kvaas.store.keys import ChunkKey
from kvaas.store.sync import SyncTieredStore

LAYERS, HEADS, DIM, BLOCK, CHUNK = 2, 3, 16, 32, 64
NUM_BLOCKS = 10
SRC_BLOCKS = (7, 2, 9, 0)  # two chunks of two blocks, out of order
DST_BLOCKS = (4, 8, 1, 5)
SENTINEL = 7.0


class _Backend:
    """An attention backend as the connector sees it: its name (FlashInfer's module needs the
    flashinfer package, absent on CPU; only the name matters to the connector)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def get_name(self) -> str:
        return self.name


@dataclass(frozen=True)
class Case:
    backend: str
    layout: KVCacheLayout
    kernel_block: int | None = None  # kernel block splitting
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        split = f"-kernel{self.kernel_block}" if self.kernel_block else ""
        return f"{self.backend}-{self.layout.name}{split}-{str(self.dtype)[6:]}"


CASES = [
    Case("CPU_ATTN", KVCacheLayout.LBHNC),
    Case("CPU_ATTN", KVCacheLayout.LBHNC, dtype=torch.bfloat16),
    Case("FLASH_ATTN", KVCacheLayout.LBNHC),  # NHD
    Case("FLASH_ATTN", KVCacheLayout.LBHNC),  # HND
    Case("FLASH_ATTN", KVCacheLayout.LBNHC, kernel_block=16, dtype=torch.float16),
    Case("TRITON_ATTN", KVCacheLayout.BLNHC),  # block-outermost
    Case("TRITON_ATTN", KVCacheLayout.LBHNC, kernel_block=16),
    Case("FLEX_ATTENTION", KVCacheLayout.LBNHC, dtype=torch.bfloat16),
    Case("FLASHINFER", KVCacheLayout.BLHNC),
    Case("FLASHINFER", KVCacheLayout.LBNHC, kernel_block=8),
]


def make_layers(
    case: Case, names: list[str], raw: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The raw buffer (``raw`` or a new one) and one view per layer, as vLLM allocates
    them."""
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=case.dtype)
    page = spec.page_size_bytes
    n = len(names)
    if case.layout.is_layer_compact:
        tensor = KVCacheTensor(page * NUM_BLOCKS * n, names, page * NUM_BLOCKS, page)
    else:
        tensor = KVCacheTensor(page * NUM_BLOCKS * n, names, page, page * n)
    raw = torch.zeros(tensor.size, dtype=torch.int8) if raw is None else raw
    views = create_kv_cache_views(
        raw, spec, NUM_BLOCKS, case.layout, tensor, kernel_block_size=case.kernel_block
    )
    return raw, views


def backend_kv(case: Case, layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as the backend's own kernels index them: ``[kernel_blocks, tokens,
    heads, dim]`` views."""
    if case.backend == "CPU_ATTN":  # cpu_attn.py: view as 2*block rows, chunk at dim 2
        b, h, n, _ = layer.size()
        k, v = layer.view((b, h, n * 2, -1)).chunk(2, dim=2)
        return k.transpose(1, 2), v.transpose(1, 2)
    k, v = layer.transpose(1, 2).split(DIM, dim=-1)  # flash_attn.py, triton, flex, flashinfer
    return k, v


def token_slot(case: Case, block_ids: tuple[int, ...], p: int) -> tuple[int, int]:
    kb = case.kernel_block or BLOCK
    ratio = BLOCK // kb
    return block_ids[p // BLOCK] * ratio + (p % BLOCK) // kb, p % kb


@dataclass
class Rig:
    case: Case
    connector: KVaaSConnector
    store: SyncTieredStore
    raw: torch.Tensor
    layers: list[torch.Tensor]
    sealing: Sealing


def _vllm_config(store: dict[str, Any], backends: dict[str, Any], **model: Any) -> Any:
    """The parts of ``VllmConfig`` the connector reads."""
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(**transfer_config(store)),
        cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
        model_config=SimpleNamespace(
            get_num_kv_heads=lambda _p: HEADS, get_head_size=lambda: DIM, use_mla=False, **model
        ),
        parallel_config=SimpleNamespace(),
        compilation_config=SimpleNamespace(
            static_forward_context={
                name: SimpleNamespace(get_attn_backend=lambda b=b: b)
                for name, b in backends.items()
            }
        ),
    )


NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def _connector(tmp: Path, backend: str, **model: Any) -> KVaaSConnector:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    cfg = StoreConfig(memory_bytes=0, disk_dir=tmp, disk_bytes=64 * 1024**2, redis_url=None)
    vc = _vllm_config(cfg.to_dict(), {n: _Backend(backend) for n in NAMES}, **model)
    return KVaaSConnector(vc, KVConnectorRole.WORKER, None)  # type: ignore[arg-type]


@pytest.fixture(params=CASES, ids=lambda c: c.id)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    case: Case = request.param
    connector = _connector(tmp_path, case.backend)
    raw, views = make_layers(case, NAMES)
    for v in views:
        v.fill_(SENTINEL)
    connector.register_kv_caches(dict(zip(NAMES, views, strict=True)))
    keys = TenantKeys("k1", {"k1": secrets.token_bytes(32)})
    cfg = StoreConfig(memory_bytes=0, disk_dir=tmp_path, disk_bytes=64 * 1024**2, redis_url=None)
    with SyncTieredStore(build_store(cfg)) as store:
        store.open()
        yield Rig(case, connector, store, raw, views, Sealing(keys, "fp", "none"))
    connector.shutdown()


def _truth(rig: Rig, block_ids: tuple[int, ...], n: int) -> torch.Tensor:
    """``[L, 2, n, H, D]``: the first ``n`` tokens' KV in ``block_ids``, read the backend's
    way."""
    out = torch.empty(LAYERS, 2, n, HEADS, DIM, dtype=rig.case.dtype)
    for li, layer in enumerate(rig.layers):
        k, v = backend_kv(rig.case, layer)
        for p in range(n):
            kb, off = token_slot(rig.case, block_ids, p)
            out[li, 0, p], out[li, 1, p] = k[kb, off], v[kb, off]
    return out


def _write(rig: Rig, block_ids: tuple[int, ...], kv: torch.Tensor) -> None:
    for li, layer in enumerate(rig.layers):
        k, v = backend_kv(rig.case, layer)
        for p in range(kv.shape[2]):
            kb, off = token_slot(rig.case, block_ids, p)
            k[kb, off], v[kb, off] = kv[li, 0, p], kv[li, 1, p]


def _run(rig: Rig, meta: KVaaSConnectorMetadata) -> set[int]:
    rig.connector.bind_connector_metadata(meta)
    try:
        rig.connector.start_load_kv(None)  # type: ignore[arg-type]
        rig.connector.wait_for_save()
    finally:
        rig.connector.clear_connector_metadata()
    return rig.connector.get_block_ids_with_load_errors()


def _kernel_blocks(case: Case, block_ids: tuple[int, ...]) -> set[int]:
    ratio = BLOCK // (case.kernel_block or BLOCK)
    return {b * ratio + i for b in block_ids for i in range(ratio)}


def test_save_then_load_is_bit_exact_and_touches_only_its_blocks(rig: Rig) -> None:
    n = len(SRC_BLOCKS) * BLOCK
    kv = torch.randn(LAYERS, 2, n, HEADS, DIM).to(rig.case.dtype)
    _write(rig, SRC_BLOCKS, kv)
    assert torch.equal(_truth(rig, SRC_BLOCKS, n), kv)
    keys = tuple(ChunkKey(os.urandom(32)) for _ in range(n // CHUNK))
    save = SaveTask("s", keys, 0, CHUNK, "none", "standard", SRC_BLOCKS, rig.sealing)
    assert _run(rig, KVaaSConnectorMetadata(saves=[save])) == set()

    # the stored chunks are the canonical token-major KV, whatever the layout
    blobs = rig.store.get_prefix(list(keys), rig.sealing.sealer())
    assert len(blobs) == len(keys)
    for i, blob in enumerate(blobs):
        assert torch.equal(codec.decode(blob), kv[:, :, i * CHUNK : (i + 1) * CHUNK])

    before = [t.clone() for t in rig.layers]
    raw_before = rig.raw.clone()
    load = LoadTask("l", keys, CHUNK, 0, n, DST_BLOCKS, rig.sealing)
    assert _run(rig, KVaaSConnectorMetadata(loads=[load])) == set()
    assert torch.equal(_truth(rig, DST_BLOCKS, n), kv)
    written = _kernel_blocks(rig.case, DST_BLOCKS)
    for layer, old in zip(rig.layers, before, strict=True):
        for b in range(layer.shape[0]):
            if b not in written:
                assert torch.equal(layer[b], old[b]), f"kernel block {b} was written"
    # no byte of the buffer outside the written blocks moved (other layers' pages included)
    expected = raw_before.clone()
    _, exp_views = make_layers(rig.case, NAMES, expected)
    for exp, layer in zip(exp_views, rig.layers, strict=True):
        for b in written:
            exp[b] = layer[b]
    assert torch.equal(expected, rig.raw)


def test_partial_load_from_a_block_boundary(rig: Rig) -> None:
    """A load that starts after the engine's own cached tokens (block 1 onwards) writes only
    the blocks from there."""
    n = len(SRC_BLOCKS) * BLOCK
    kv = torch.randn(LAYERS, 2, n, HEADS, DIM).to(rig.case.dtype)
    keys = tuple(ChunkKey(os.urandom(32)) for _ in range(n // CHUNK))
    rig.store.put_chunks(
        [(k, codec.encode(kv[:, :, i * CHUNK : (i + 1) * CHUNK].contiguous(), "none"))
         for i, k in enumerate(keys)],
        "standard",
        rig.sealing.sealer(),
    )  # fmt: skip
    before = [t.clone() for t in rig.layers]
    load = LoadTask("l", keys, CHUNK, BLOCK, n - BLOCK // 2, DST_BLOCKS, rig.sealing)
    assert _run(rig, KVaaSConnectorMetadata(loads=[load])) == set()
    got = _truth(rig, DST_BLOCKS, n)
    lo, hi = BLOCK, n - BLOCK // 2
    assert torch.equal(got[:, :, lo:hi], kv[:, :, lo:hi])
    old = torch.stack([before[i] for i in range(LAYERS)])
    for li, layer in enumerate(rig.layers):  # block DST_BLOCKS[0] and the tail are untouched
        for b in _kernel_blocks(rig.case, DST_BLOCKS[:1]):
            assert torch.equal(layer[b], old[li][b])
    tail = _truth(rig, DST_BLOCKS, n)[:, :, hi:]
    assert torch.all(tail == SENTINEL)


# ------------------------------------------------------------------ refused at start-up
def test_unknown_backend_is_refused_at_start_up(tmp_path: Path) -> None:
    c = _connector(tmp_path, "ROCM_AITER_FA")
    _, views = make_layers(Case("FLASH_ATTN", KVCacheLayout.LBNHC), NAMES)
    with pytest.raises(LayoutError, match="ROCM_AITER_FA attention backend"):
        c.register_kv_caches(dict(zip(NAMES, views, strict=True)))


def test_missing_backend_is_refused(tmp_path: Path) -> None:
    c = _connector(tmp_path, "FLASH_ATTN")
    _, views = make_layers(Case("FLASH_ATTN", KVCacheLayout.LBNHC), NAMES)
    other = [f"other.{i}.attn" for i in range(LAYERS)]
    with pytest.raises(LayoutError, match="cannot tell the attention backend"):
        c.register_kv_caches(dict(zip(other, views, strict=True)))


def test_fp8_cache_is_refused_at_start_up(tmp_path: Path) -> None:
    c = _connector(tmp_path, "FLASH_ATTN")
    _, views = make_layers(Case("FLASH_ATTN", KVCacheLayout.LBNHC), NAMES)
    as_bytes = [v.view(torch.uint8) for v in views]  # what an fp8 cache's views look like
    with pytest.raises(LayoutError, match="fp8"):
        c.register_kv_caches(dict(zip(NAMES, as_bytes, strict=True)))
    c._vllm_config.cache_config.cache_dtype = "fp8_e4m3"  # type: ignore[attr-defined]
    with pytest.raises(LayoutError, match="kv_cache_dtype='fp8_e4m3'"):
        c.register_kv_caches(dict(zip(NAMES, views, strict=True)))


def test_mla_is_refused_at_start_up(tmp_path: Path) -> None:
    c = _connector(tmp_path, "FLASH_ATTN")
    c._vllm_config.model_config.use_mla = True  # type: ignore[attr-defined]
    latent = {n: torch.zeros(NUM_BLOCKS, BLOCK, 576) for n in NAMES}  # MLA: one latent tensor
    with pytest.raises(LayoutError, match="MLA"):
        c.register_kv_caches(latent)


def test_mla_shaped_cache_is_refused_even_unflagged(tmp_path: Path) -> None:
    c = _connector(tmp_path, "FLASH_ATTN")
    latent = {n: torch.zeros(NUM_BLOCKS, BLOCK, 576) for n in NAMES}
    with pytest.raises(LayoutError, match="unsupported paged KV tensor"):
        c.register_kv_caches(latent)


def test_rows_placement_needs_a_dense_interior(tmp_path: Path) -> None:
    c = _connector(tmp_path, "CPU_ATTN")
    _, views = make_layers(Case("FLASH_ATTN", KVCacheLayout.LBNHC), NAMES)  # NHD strides
    with pytest.raises(LayoutError, match="dense"):
        c.register_kv_caches(dict(zip(NAMES, views, strict=True)))


# ------------------------------------------------------------------ failed loads, never a crash
def _store_chunks(rig: Rig, kvs: list[torch.Tensor]) -> tuple[ChunkKey, ...]:
    keys = tuple(ChunkKey(os.urandom(32)) for _ in kvs)
    rig.store.put_chunks(
        [(k, codec.encode(kv.contiguous(), "none")) for k, kv in zip(keys, kvs, strict=True)],
        "standard",
        rig.sealing.sealer(),
    )
    return keys


@pytest.mark.parametrize(
    "what", ["heads", "dim", "layers", "tokens", "dtype"], ids=lambda w: f"other-{w}"
)
def test_chunk_not_fitting_the_destination_is_a_failed_load(rig: Rig, what: str) -> None:
    """Chunk 1 was made for another shape or dtype (another model, TP size or KV dtype): chunk
    0 loads, chunk 1's blocks are reported failed for vLLM to recompute, none is written."""
    good = torch.randn(LAYERS, 2, CHUNK, HEADS, DIM).to(rig.case.dtype)
    shape = {
        "heads": (LAYERS, 2, CHUNK, HEADS - 1, DIM),
        "dim": (LAYERS, 2, CHUNK, HEADS, DIM // 2),
        "layers": (LAYERS + 1, 2, CHUNK, HEADS, DIM),
        "tokens": (LAYERS, 2, CHUNK // 2, HEADS, DIM),
    }.get(what, (LAYERS, 2, CHUNK, HEADS, DIM))
    other = rig.case.dtype
    if what == "dtype":  # e.g. a float32 chunk for a bfloat16 cache: refused, never cast
        other = torch.bfloat16 if rig.case.dtype == torch.float32 else torch.float32
    keys = _store_chunks(rig, [good, torch.randn(shape).to(other)])
    before = [t.clone() for t in rig.layers]
    load = LoadTask("l", keys, CHUNK, 0, 2 * CHUNK, DST_BLOCKS, rig.sealing)
    assert _run(rig, KVaaSConnectorMetadata(loads=[load])) == set(DST_BLOCKS[2:])
    assert torch.equal(_truth(rig, DST_BLOCKS, CHUNK), good)
    second = _kernel_blocks(rig.case, DST_BLOCKS[2:])
    for layer, old in zip(rig.layers, before, strict=True):
        for b in second:
            assert torch.equal(layer[b], old[b])


def test_a_copy_that_raises_is_a_failed_load(rig: Rig) -> None:
    """A load whose blocks the copy cannot address (a block id past the cache) fails the whole
    task's blocks instead of raising out of the worker."""
    keys = _store_chunks(rig, [torch.randn(LAYERS, 2, CHUNK, HEADS, DIM).to(rig.case.dtype)])
    blocks = (3, NUM_BLOCKS + 5)
    load = LoadTask("l", keys, CHUNK, 0, CHUNK, blocks, rig.sealing)
    assert _run(rig, KVaaSConnectorMetadata(loads=[load])) == set(blocks)


def _rig(case: Case, tmp: Path) -> Rig:
    connector = _connector(tmp, case.backend)
    raw, views = make_layers(case, NAMES)
    for v in views:
        v.fill_(SENTINEL)
    connector.register_kv_caches(dict(zip(NAMES, views, strict=True)))
    cfg = StoreConfig(memory_bytes=0, disk_dir=tmp, disk_bytes=64 * 1024**2, redis_url=None)
    store = SyncTieredStore(build_store(cfg))
    store.open()
    keys = TenantKeys("k1", {"k1": b"k" * 32})
    return Rig(case, connector, store, raw, views, Sealing(keys, "fp", "none"))


@pytest.mark.parametrize(
    ("saver", "loader"),
    [
        # FlashAttention NHD with kernel blocks -> CPU rows
        (Case("FLASH_ATTN", KVCacheLayout.LBNHC, kernel_block=16), CASES[0]),
        (CASES[0], CASES[8]),  # CPU rows -> FlashInfer HND, block-outermost
    ],
    ids=["nhd-split-to-cpu", "cpu-to-hnd"],
)
def test_chunks_saved_on_one_layout_load_on_another(
    tmp_path: Path, saver: Case, loader: Case
) -> None:
    """The same engine model on another backend (a GPU node and a CPU node sharing a store)
    reads exactly the KV the other saved."""
    a, b = _rig(saver, tmp_path), _rig(loader, tmp_path)
    n = len(SRC_BLOCKS) * BLOCK
    kv = torch.randn(LAYERS, 2, n, HEADS, DIM)
    _write(a, SRC_BLOCKS, kv)
    keys = tuple(ChunkKey(os.urandom(32)) for _ in range(n // CHUNK))
    save = SaveTask("s", keys, 0, CHUNK, "none", "standard", SRC_BLOCKS, a.sealing)
    assert _run(a, KVaaSConnectorMetadata(saves=[save])) == set()
    load = LoadTask("l", keys, CHUNK, 0, n, DST_BLOCKS, b.sealing)
    assert _run(b, KVaaSConnectorMetadata(loads=[load])) == set()
    assert torch.equal(_truth(b, DST_BLOCKS, n), kv)
    for r in (a, b):
        r.store.close()
        r.connector.shutdown()


# ------------------------------------------------------------------ the paged loader
def _old_path(rig: Rig, blobs: list[bytes], first: int, start: int, end: int) -> None:
    """The connector's former load: ``codec.decode`` of each chunk, ``torch.cat``, then one
    per-token indexed write per layer."""
    views = [rig.connector._layout.keys_values(t) for t in rig.layers]  # type: ignore[union-attr]
    kv = torch.cat([codec.decode(b) for b in blobs], dim=2)[:, :, start - first : end - first]
    blk, off = slots(DST_BLOCKS, start, end, rig.connector._layout)  # type: ignore[arg-type]
    for i, v in enumerate(views):
        scatter(v, blk, off, kv[i])


@pytest.mark.parametrize("scheme", ["none", "lossless", "int8", "int4"])
@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 4 * BLOCK), (BLOCK, 4 * BLOCK - BLOCK // 2), (CHUNK + 8, 3 * BLOCK + 3)],
    ids=["whole", "from-block-1", "ragged"],
)
def test_paged_loader_writes_what_the_former_path_wrote(
    rig: Rig, scheme: str, start: int, end: int
) -> None:
    """Decoding into the staging buffers and copying whole kernel blocks writes exactly the
    bytes the former decode + cat + per-token scatter wrote, on every layout and scheme, for
    loads from the first token, from a later block, and not on block boundaries (the
    per-token fallback); every other byte of the cache is left alone."""
    n = len(DST_BLOCKS) * BLOCK
    kv = torch.randn(LAYERS, 2, n, HEADS, DIM).to(rig.case.dtype)
    blobs = [codec.encode(kv[:, :, i : i + CHUNK].contiguous(), scheme) for i in range(0, n, CHUNK)]
    first = (start // CHUNK) * CHUNK
    blobs = blobs[start // CHUNK : -(-end // CHUNK)]
    _old_path(rig, blobs, first, start, end)
    want = rig.raw.clone()
    for t in rig.layers:
        t.fill_(SENTINEL)
    assert rig.connector._loader is not None
    shape = ChunkShape(LAYERS, CHUNK, HEADS, DIM, rig.case.dtype)
    done = rig.connector._loader.load(blobs, shape, first, start, end, DST_BLOCKS)
    assert (done.end, done.refused) == (end, None)
    assert torch.equal(rig.raw, want)


def test_paged_loader_stops_at_a_chunk_that_does_not_decode(rig: Rig) -> None:
    """A chunk whose payload does not decode (verified by the store, so its checksum is not
    checked again) ends the load: the chunks before it are written, nothing after it."""
    n = 2 * CHUNK
    kv = torch.randn(LAYERS, 2, n, HEADS, DIM).to(rig.case.dtype)
    good = codec.encode(kv[:, :, :CHUNK].contiguous(), "int4")
    bad = bytearray(codec.encode(kv[:, :, CHUNK:].contiguous(), "int4"))
    bad[28:30] = b"{]"  # not a JSON parameter block
    assert rig.connector._loader is not None
    shape = ChunkShape(LAYERS, CHUNK, HEADS, DIM, rig.case.dtype)
    done = rig.connector._loader.load([good, bytes(bad)], shape, 0, 0, n, DST_BLOCKS)
    assert done.end == CHUNK and done.refused is not None and "chunk 1" in done.refused
    assert torch.equal(_truth(rig, DST_BLOCKS, CHUNK), codec.decode(good))
    assert torch.all(_truth(rig, DST_BLOCKS, n)[:, :, CHUNK:] == SENTINEL)


def test_a_prompts_partial_last_chunk_is_saved_and_loaded_on_its_own_length(rig: Rig) -> None:
    """A plan whose last key names the prompt's partial last chunk (``tail`` tokens): the save
    stores exactly those tokens (a blob of their length), and a load writes them back after
    the full chunks, bit-exact, leaving the blocks' tokens past the prompt alone; a load that
    ends inside the partial chunk (block-aligned, as the scheduler asks) writes up to there."""
    tail = CHUNK - BLOCK // 2 - 8  # not a multiple of the block size
    n = CHUNK + tail
    kv = torch.randn(LAYERS, 2, n, HEADS, DIM).to(rig.case.dtype)
    _write(rig, SRC_BLOCKS, kv)
    keys = (ChunkKey(os.urandom(32)), ChunkKey(os.urandom(32)))
    save = SaveTask("s", keys, 0, CHUNK, "none", "standard", SRC_BLOCKS, rig.sealing, tail)
    assert _run(rig, KVaaSConnectorMetadata(saves=[save])) == set()
    blobs = rig.store.get_prefix(list(keys), rig.sealing.sealer())
    assert [codec.inspect(b).shape[2] for b in blobs] == [CHUNK, tail]
    assert torch.equal(codec.decode(blobs[1]), kv[:, :, CHUNK:n])

    whole = len(DST_BLOCKS) * BLOCK
    load = LoadTask("l", keys, CHUNK, 0, n, DST_BLOCKS, rig.sealing, tail)
    assert _run(rig, KVaaSConnectorMetadata(loads=[load])) == set()
    got = _truth(rig, DST_BLOCKS, whole)
    assert torch.equal(got[:, :, :n], kv)
    assert bool((got[:, :, n:] == SENTINEL).all())  # past the prompt: untouched

    for layer in rig.layers:
        layer.fill_(SENTINEL)
    end = n // BLOCK * BLOCK
    load = LoadTask("m", keys, CHUNK, 0, end, DST_BLOCKS, rig.sealing, tail)
    assert _run(rig, KVaaSConnectorMetadata(loads=[load])) == set()
    got = _truth(rig, DST_BLOCKS, whole)
    assert torch.equal(got[:, :, :end], kv[:, :, :end])
    assert bool((got[:, :, end:] == SENTINEL).all())


def test_a_partial_chunk_blob_in_a_full_chunks_place_is_a_failed_load(rig: Rig) -> None:
    """The tail's length is part of what a load expects: a partial chunk's blob under a key
    the plan names as full (or a full one where the plan says partial) is refused, and its
    blocks are reported for recomputation."""
    tail = BLOCK
    kv = torch.randn(LAYERS, 2, CHUNK + tail, HEADS, DIM).to(rig.case.dtype)
    keys = (ChunkKey(os.urandom(32)), ChunkKey(os.urandom(32)))
    rig.store.put_chunks(
        [(keys[0], codec.encode(kv[:, :, :CHUNK].contiguous(), "none")),
         (keys[1], codec.encode(kv[:, :, CHUNK:].contiguous(), "none"))],
        "standard",
        rig.sealing.sealer(),
    )  # fmt: skip
    as_full = LoadTask("f", keys, CHUNK, 0, 2 * CHUNK, DST_BLOCKS, rig.sealing)
    failed = _run(rig, KVaaSConnectorMetadata(loads=[as_full]))
    assert failed == set(DST_BLOCKS[CHUNK // BLOCK : 2 * CHUNK // BLOCK])
    as_other_tail = LoadTask(
        "g", keys, CHUNK, 0, CHUNK + tail, DST_BLOCKS, rig.sealing, 2 * BLOCK - 1
    )
    failed = _run(rig, KVaaSConnectorMetadata(loads=[as_other_tail]))
    assert failed == set(DST_BLOCKS[CHUNK // BLOCK : (CHUNK + tail) // BLOCK])
