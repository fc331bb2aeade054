"""Tensor- and pipeline-parallel engines on one shared store.

Each rank of a sharded engine holds only its share of a chunk's KV (its KV heads under TP, its
layers under PP). Two real worker connectors (ranks 0 and 1 of TP=2) save the same plan's
chunks into one disk store, then load them back: each rank must get its own heads, never the
other rank's. The scheduler must report a hit only when every rank's piece is stored. A world
of one keeps the plain chunk keys, so data stored before sharding existed stays readable.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from kvaas.connector import transfer_config
from kvaas.connector.connector import (
    KVaaSConnector,
    KVaaSConnectorMetadata,
    LoadTask,
    SaveTask,
    Sealing,
)
from kvaas.connector.paged import LayoutError, gather, slots
from kvaas.connector.params import TransferPlan
from kvaas.store.crypto import TenantKeys
from kvaas.store.factory import StoreConfig, build_store
from kvaas.store.keys import ChunkKey, ShardRank, shard_key, shard_keys
from kvaas.store.sync import SyncTieredStore

LAYERS, HEADS_PER_RANK, DIM, BLOCK, CHUNK = 2, 2, 16, 16, 32
NUM_BLOCKS, CHUNKS = 8, 2
SRC, DST = (5, 1, 6, 2), (0, 3, 4, 7)
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def _store(path: Path) -> StoreConfig:
    return StoreConfig(memory_bytes=0, disk_dir=path, disk_bytes=64 * 1024**2, redis_url=None)


def _vllm_config(store: Path, **parallel: Any) -> Any:
    cfg = _store(store)
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(**transfer_config(cfg.to_dict())),
        cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
        model_config=SimpleNamespace(
            get_num_kv_heads=lambda _p: HEADS_PER_RANK, get_head_size=lambda: DIM, use_mla=False
        ),
        parallel_config=SimpleNamespace(**parallel),
        compilation_config=SimpleNamespace(
            static_forward_context={
                n: SimpleNamespace(get_attn_backend=lambda: CPUAttentionBackend) for n in NAMES
            }
        ),
    )


def _worker(store: Path, **parallel: Any) -> tuple[KVaaSConnector, list[torch.Tensor]]:
    c = KVaaSConnector(_vllm_config(store, **parallel), KVConnectorRole.WORKER, None)  # type: ignore[arg-type]
    layers = [torch.zeros(NUM_BLOCKS, HEADS_PER_RANK, BLOCK, 2 * DIM) for _ in NAMES]
    c.register_kv_caches(dict(zip(NAMES, layers, strict=True)))
    return c, layers


def _run(c: KVaaSConnector, meta: KVaaSConnectorMetadata) -> set[int]:
    c.bind_connector_metadata(meta)
    try:
        c.start_load_kv(None)  # type: ignore[arg-type]
        c.wait_for_save()
    finally:
        c.clear_connector_metadata()
    return c.get_block_ids_with_load_errors()


def _read(c: KVaaSConnector, blocks: tuple[int, ...]) -> torch.Tensor:
    layout = c._layout
    assert layout is not None
    blk, off = slots(blocks, 0, CHUNKS * CHUNK, layout)
    return torch.stack([gather(v, blk, off) for v in c._kv_views])


def _write(c: KVaaSConnector, blocks: tuple[int, ...], kv: torch.Tensor) -> None:
    from kvaas.connector.paged import scatter

    layout = c._layout
    assert layout is not None
    blk, off = slots(blocks, 0, CHUNKS * CHUNK, layout)
    for i, v in enumerate(c._kv_views):
        scatter(v, blk, off, kv[i])


@pytest.fixture
def sealing() -> Sealing:
    return Sealing(TenantKeys("k1", {"k1": secrets.token_bytes(32)}), "fp", "none")


def _save_task(keys: tuple[ChunkKey, ...], sealing: Sealing) -> SaveTask:
    return SaveTask("s", keys, 0, CHUNK, "none", "standard", SRC, sealing)


def test_two_ranks_each_load_their_own_heads(tmp_path: Path, sealing: Sealing) -> None:
    ranks = [_worker(tmp_path, tensor_parallel_size=2, rank=r) for r in range(2)]
    keys = tuple(ChunkKey(os.urandom(32)) for _ in range(CHUNKS))
    shape = (LAYERS, 2, CHUNKS * CHUNK, HEADS_PER_RANK, DIM)
    kv = [torch.randn(shape), torch.randn(shape)]  # each rank's own heads
    for (c, _), mine in zip(ranks, kv, strict=True):
        _write(c, SRC, mine)
        assert _run(c, KVaaSConnectorMetadata(saves=[_save_task(keys, sealing)])) == set()
    load = LoadTask("l", keys, CHUNK, 0, CHUNKS * CHUNK, DST, sealing)
    for (c, layers), mine in zip(ranks, kv, strict=True):
        for t in layers:
            t.zero_()
        assert _run(c, KVaaSConnectorMetadata(loads=[load])) == set()
        assert torch.equal(_read(c, DST), mine)
    for c, _ in ranks:
        c.shutdown()


def _scheduler(store: Path, **parallel: Any) -> KVaaSConnector:
    return KVaaSConnector(_vllm_config(store, **parallel), KVConnectorRole.SCHEDULER, None)  # type: ignore[arg-type]


def _matched(s: KVaaSConnector, keys: tuple[ChunkKey, ...]) -> int:
    plan = TransferPlan("load", keys, CHUNK, scheme="none", fingerprint="fp")
    req = SimpleNamespace(
        request_id=secrets.token_hex(4),
        kv_transfer_params=plan.to_params(),
        prompt_token_ids=list(range(CHUNKS * CHUNK + 5)),
    )
    n, _ = s.get_num_new_matched_tokens(req, 0)  # type: ignore[arg-type]
    assert n is not None
    return n


def test_scheduler_sees_a_hit_only_when_every_rank_stored_its_piece(
    tmp_path: Path, sealing: Sealing
) -> None:
    sched = _scheduler(tmp_path, tensor_parallel_size=2)
    keys = tuple(ChunkKey(os.urandom(32)) for _ in range(CHUNKS))
    rank0, _ = _worker(tmp_path, tensor_parallel_size=2, rank=0)
    rank1, _ = _worker(tmp_path, tensor_parallel_size=2, rank=1)
    assert _run(rank0, KVaaSConnectorMetadata(saves=[_save_task(keys, sealing)])) == set()
    assert _matched(sched, keys) == 0  # rank 1's heads are missing
    only_first = _save_task(keys[:1], sealing)
    assert _run(rank1, KVaaSConnectorMetadata(saves=[only_first])) == set()
    assert _matched(sched, keys) == CHUNK  # chunk 0 complete, chunk 1 not
    assert _run(rank1, KVaaSConnectorMetadata(saves=[_save_task(keys, sealing)])) == set()
    assert _matched(sched, keys) == CHUNKS * CHUNK
    for c in (sched, rank0, rank1):
        c.shutdown()


def test_pipeline_stages_store_separate_pieces(tmp_path: Path, sealing: Sealing) -> None:
    """Rank 2 of TP=2, PP=2 is TP rank 0 of stage 1: its piece has its own key."""
    c, _ = _worker(tmp_path, tensor_parallel_size=2, pipeline_parallel_size=2, rank=2)
    assert c._rank == ShardRank(0, 2, 1, 2)
    keys = tuple(ChunkKey(os.urandom(32)) for _ in range(CHUNKS))
    assert _run(c, KVaaSConnectorMetadata(saves=[_save_task(keys, sealing)])) == set()
    with SyncTieredStore(build_store(_store(tmp_path))) as store:
        store.open()
        found = store.exists_many(shard_keys(keys, 2, 2))
        assert found == [False, False, True, False] * CHUNKS
        assert store.exists_many(list(keys)) == [False] * CHUNKS
    c.shutdown()


def test_world_of_one_keeps_the_plain_chunk_keys(tmp_path: Path, sealing: Sealing) -> None:
    c, _ = _worker(tmp_path)
    keys = tuple(ChunkKey(os.urandom(32)) for _ in range(CHUNKS))
    assert _run(c, KVaaSConnectorMetadata(saves=[_save_task(keys, sealing)])) == set()
    with SyncTieredStore(build_store(_store(tmp_path))) as store:
        store.open()
        assert store.exists_many(list(keys)) == [True] * CHUNKS
    assert _matched(_scheduler(tmp_path), keys) == CHUNKS * CHUNK
    c.shutdown()


def test_shard_keys_are_distinct_and_keep_the_slot() -> None:
    key = ChunkKey(os.urandom(32))
    assert shard_key(key, ShardRank()) == key
    every = [shard_key(key, r) for w in ((2, 1), (4, 1), (2, 2), (1, 2)) for r in ShardRank.all(*w)]
    assert len(set(every)) == len(every) and key not in every
    assert all(k[:4] == key[:4] and len(k) == 32 for k in every)


def test_context_parallelism_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="decode_context_parallel_size"):
        _worker(tmp_path, decode_context_parallel_size=2)
