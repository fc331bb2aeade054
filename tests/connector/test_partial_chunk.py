"""A prompt's partial last chunk in the connector's plans and its scheduler half.

The plan's ``tail`` names the tokens of its last key's chunk when that chunk is partial. A real
scheduler connector on a real disk store: it reports the partial chunk's tokens as matched
only when every chunk before it and the partial chunk itself are stored (block-aligned, at
least one prompt token left to compute), and hands the partial chunk to the worker for saving
only once the prompt's computed tokens reach its end.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvaas import codec
from kvaas.connector import transfer_config
from kvaas.connector.connector import KVaaSConnector
from kvaas.connector.params import TransferPlan
from kvaas.store.factory import StoreConfig
from kvaas.store.keys import ChunkKey
from kvaas.store.sync import SyncTieredStore

BLOCK, CHUNK, TAIL = 16, 64, 40  # the partial chunk: 2.5 blocks


def _keys(n: int) -> tuple[ChunkKey, ...]:
    return tuple(ChunkKey(secrets.token_bytes(32)) for _ in range(n))


def test_a_plan_carries_its_partial_chunk_and_counts_its_tokens() -> None:
    keys = _keys(3)
    plan = TransferPlan("load", keys, CHUNK, "none", fingerprint="fp", tail=TAIL)
    assert TransferPlan.from_params(plan.to_params()) == plan
    assert plan.tokens == 2 * CHUNK + TAIL
    assert [plan.tokens_in(n) for n in range(4)] == [0, CHUNK, 2 * CHUNK, 2 * CHUNK + TAIL]
    done = [0, CHUNK - 1, CHUNK, 2 * CHUNK + TAIL - 1, 2 * CHUNK + TAIL, 10 * CHUNK]
    assert [plan.chunks_within(t) for t in done] == [0, 0, 1, 2, 3, 3]
    full = TransferPlan("load", keys, CHUNK)
    assert full.tokens == 3 * CHUNK and full.chunks_within(2 * CHUNK + TAIL) == 2


@pytest.mark.parametrize("tail", [CHUNK, -1, True, "4", 1.5])
def test_a_plan_with_a_bad_tail_is_refused(tail: object) -> None:
    doc = TransferPlan("load", _keys(2), CHUNK).to_params()
    doc["kvaas"]["tail"] = tail
    with pytest.raises(ValueError, match="tail"):
        TransferPlan.from_params(doc)


def test_a_tail_without_keys_is_refused() -> None:
    doc = TransferPlan("load", (), CHUNK).to_params()
    doc["kvaas"]["tail"] = 3
    with pytest.raises(ValueError, match="tail"):
        TransferPlan.from_params(doc)


def _scheduler(path: Path) -> KVaaSConnector:
    store = StoreConfig(memory_bytes=0, disk_dir=path, disk_bytes=64 << 20, redis_url=None)
    transfer = transfer_config(store.to_dict())
    transfer["kv_connector_extra_config"]["presence_ttl_s"] = 0.0
    cfg: Any = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(**transfer),
        cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
        parallel_config=SimpleNamespace(),
    )
    return KVaaSConnector(cfg, KVConnectorRole.SCHEDULER, None)  # type: ignore[arg-type]


def _put(path: Path, items: list[tuple[ChunkKey, int]]) -> None:
    cfg = StoreConfig(
        memory_bytes=0, disk_dir=path, disk_bytes=64 << 20, redis_url=None, encrypted=False
    )
    with SyncTieredStore.from_config(cfg) as store:
        blobs = [(k, codec.encode(torch.zeros(1, 2, n, 1, 8), "none")) for k, n in items]
        store.put_chunks(blobs, "cold")


def _request(plan: TransferPlan, prompt_tokens: int, rid: str) -> Any:
    return SimpleNamespace(
        request_id=rid,
        kv_transfer_params=plan.to_params(),
        prompt_token_ids=list(range(prompt_tokens)),
    )


def test_the_partial_chunk_is_matched_only_after_every_full_chunk(tmp_path: Path) -> None:
    keys = _keys(3)
    plan = TransferPlan("load", keys, CHUNK, "none", fingerprint="fp", tail=TAIL)
    sched = _scheduler(tmp_path)
    try:

        def matched(prompt: int, rid: str) -> int:
            n, _ = sched.get_num_new_matched_tokens(_request(plan, prompt, rid), 0)
            assert n is not None
            return n

        _put(tmp_path, [(keys[2], TAIL)])
        assert matched(500, "a") == 0  # the partial chunk alone: nothing before it
        _put(tmp_path, [(keys[0], CHUNK), (keys[1], CHUNK)])
        # every chunk: the partial one's tokens too, down to a block boundary
        assert matched(500, "b") == (2 * CHUNK + TAIL) // BLOCK * BLOCK
        # a request of exactly the cached tokens computes its last one (and that block)
        assert matched(2 * CHUNK + TAIL, "c") == (2 * CHUNK + TAIL - 1) // BLOCK * BLOCK
        full_only = TransferPlan("load", keys[:2], CHUNK, "none", fingerprint="fp")
        n, _ = sched.get_num_new_matched_tokens(_request(full_only, 500, "d"), 0)
        assert n == 2 * CHUNK
    finally:
        sched.shutdown()


def test_the_partial_chunk_is_saved_once_the_prompt_reaches_its_end(tmp_path: Path) -> None:
    keys = _keys(3)
    plan = TransferPlan("save", keys, CHUNK, "none", fingerprint="fp", tail=TAIL)
    sched = _scheduler(tmp_path)
    try:
        sched.get_num_new_matched_tokens(_request(plan, 2 * CHUNK + TAIL, "s"), 0)
        first = sched._save_tasks("s", 2 * CHUNK + 8)  # chunked prefill: the full ones done
        assert first is not None
        assert (first.keys, first.first, first.tail) == (keys[:2], 0, 0)
        assert sched._save_tasks("s", 2 * CHUNK + TAIL - 1) is None
        last = sched._save_tasks("s", 2 * CHUNK + TAIL)
        assert last is not None
        assert (last.keys, last.first, last.tail) == (keys[2:], 2, TAIL)
        assert [last.chunk_tokens_of(i) for i in range(len(last.keys))] == [TAIL]
        assert sched._save_tasks("s", 2 * CHUNK + TAIL + 5) is None  # saved once
    finally:
        sched.shutdown()
