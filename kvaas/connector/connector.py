"""The KVaaS KV connector for vLLM (``KVConnectorBase_V1``).

Load it with::

    KVTransferConfig(kv_connector="KVaaSConnector",
                     kv_connector_module_path="kvaas.connector.connector",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"store": StoreConfig(...).to_dict()})

(:func:`kvaas.connector.transfer_config` builds it; a remote node's has ``"redis_url_env":
"KVAAS_REDIS_URL"`` beside the store, whose Redis URL is then read from that environment
variable, never from the command line.) Requests opt in with a
:class:`~kvaas.connector.params.TransferPlan` in ``kv_transfer_params``.

**Scheduler side** (no side effects beyond its own bookkeeping): for a ``load`` plan (and for
the first ``skip`` chunks of a ``save`` plan that extends a stored prefix),
``get_num_new_matched_tokens`` asks the store how many leading chunks it holds (one batched
existence check over the shared tiers) and reports that many tokens, capped so that at least
one prompt token is computed and aligned down to the engine's block size. Every step,
``build_connector_meta`` turns allocations into :class:`LoadTask` s and, for ``save`` plans,
turns chunks whose tokens this step completes into :class:`SaveTask` s. The metadata is the
only channel to the worker side.

**Worker side**: ``start_load_kv`` fetches a request's chunks concurrently from the tiers,
opens them with the plan's tenant keys (:class:`~kvaas.store.crypto.ChunkSealer`: AES-GCM,
bound to each chunk's key, the model fingerprint and the scheme), checks each chunk's header
against this engine's layers, KV heads, head size, dtype and the plan's chunk size, decodes them
and scatters them into the request's paged blocks (one indexed copy per layer) before the
forward pass. A chunk that is missing, corrupt, fails authentication, does not fit or does not
decode ends the load: it and every chunk after it are reported through
``get_block_ids_with_load_errors`` and vLLM recomputes them (``kv_load_failure_policy =
"recompute"``); nothing a stored chunk holds raises out of the worker. ``wait_for_save``
runs after the step's forward pass: it gathers the completed chunks' KV from the paged blocks,
encodes each chunk with the plan's scheme, seals it and writes the chunks the store does not
hold yet, in one batch. The worker never sees a master key: the
plan carries the tenant's derived keys (see :mod:`kvaas.store.crypto`).

Layouts and sharding: at start-up the worker takes each layer's K/V placement from its
attention backend and refuses layouts it cannot copy (:mod:`kvaas.connector.engine_layout`,
:mod:`kvaas.connector.paged`). In a tensor- or pipeline-parallel engine each worker reads and
writes its share of a chunk under its shard key (:func:`kvaas.store.keys.shard_key`; the plan's
key itself in a world of one), and the scheduler counts a chunk only when every rank's piece is
stored.

Partial trailing chunk: only full chunks are stored; the last ``len(prompt) % chunk_tokens``
tokens of a cached prompt are recomputed on attach together with the request's new tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvaas import codec
from kvaas.connector import store_config
from kvaas.connector.chunks import ChunkShape, decode_fitting
from kvaas.connector.engine_layout import resolve_layout, shard_rank
from kvaas.connector.paged import PagedLayout, gather, scatter, slots
from kvaas.connector.params import TransferPlan
from kvaas.store.crypto import ChunkSealer, TenantKeys
from kvaas.store.factory import StoreConfig, build_store
from kvaas.store.keys import ChunkKey, shard_key, shard_keys
from kvaas.store.sync import SyncTieredStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvaas.connector")


@dataclass(frozen=True, slots=True)
class Sealing:
    """What the worker seals and opens a plan's chunks with (plain values: the connector
    metadata crosses from the scheduler to the worker processes)."""

    keys: TenantKeys | None
    fingerprint: str
    scheme: str

    @classmethod
    def of(cls, plan: TransferPlan) -> Sealing:
        return cls(plan.seal, plan.fingerprint, plan.scheme)

    def sealer(self) -> ChunkSealer | None:
        """The sealer (``None`` when the plan carries no keys: an encrypted store refuses)."""
        if self.keys is None:
            return None
        return ChunkSealer(self.keys, self.fingerprint, self.scheme)


@dataclass(frozen=True, slots=True)
class LoadTask:
    """Load tokens ``[start, end)`` of a request from ``keys`` (the plan's chunk keys)."""

    req_id: str
    keys: tuple[ChunkKey, ...]
    chunk_tokens: int
    start: int
    end: int
    block_ids: tuple[int, ...]
    sealing: Sealing


@dataclass(frozen=True, slots=True)
class SaveTask:
    """Store chunks ``first .. first + len(keys) - 1`` of a request."""

    req_id: str
    keys: tuple[ChunkKey, ...]
    first: int
    chunk_tokens: int
    scheme: str
    storage_class: str
    block_ids: tuple[int, ...]
    sealing: Sealing


@dataclass
class KVaaSConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadTask] = field(default_factory=list)
    saves: list[SaveTask] = field(default_factory=list)


@dataclass
class KVaaSWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker → scheduler: requests whose load fell short, with the tokens actually loaded
    (counted from the request's first token)."""

    short_loads: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVaaSWorkerMetadata)
        merged = dict(self.short_loads)
        for rid, n in other.short_loads.items():
            merged[rid] = min(n, merged.get(rid, n))
        return KVaaSWorkerMetadata(merged)


@dataclass
class _SaveState:
    plan: TransferPlan
    block_ids: list[int]
    saved: int = 0  # chunks already handed to the worker (or stored before: the plan's skip)


def _store_config(vllm_config: VllmConfig) -> StoreConfig:
    transfer = vllm_config.kv_transfer_config
    return store_config(transfer.kv_connector_extra_config if transfer is not None else None)


class KVaaSConnector(KVConnectorBase_V1):
    """Moves prompt KV between vLLM's paged memory and the KVaaS tiered store."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._rank = shard_rank(vllm_config)  # the scheduler's is rank 0: only sizes count
        cfg = _store_config(vllm_config)
        self._store: SyncTieredStore | None = None
        if role == KVConnectorRole.SCHEDULER:
            # the lookup only needs the shared tiers: every write lands in one of them. A
            # memory-only store has none: the scheduler then trusts the plan (optimistic) and
            # the worker reports chunks it cannot find, which vLLM recomputes.
            cfg = StoreConfig.from_dict({**cfg.to_dict(), "memory_bytes": 0})
            if cfg.disk_dir is not None or cfg.redis_url:
                self._store = SyncTieredStore(build_store(cfg))
        else:
            self._store = SyncTieredStore(build_store(cfg))
        if self._store is not None:
            self._store.open()
        # scheduler state
        self._lookups: dict[str, tuple[int, int]] = {}  # req -> (local computed, matched)
        self._pending_loads: dict[str, tuple[Request, int, int]] = {}
        self._saves: dict[str, _SaveState] = {}
        # worker state
        self._layers: list[tuple[str, torch.Tensor]] = []
        self._kv_views: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: (K, V)
        self._layout: PagedLayout | None = None
        self._failed_blocks: set[int] = set()
        self._short_loads: dict[str, int] = {}  # worker: this step's; scheduler: all seen
        if role == KVConnectorRole.WORKER:
            mc = vllm_config.model_config
            self._kv_heads = mc.get_num_kv_heads(vllm_config.parallel_config)
            self._head_dim = mc.get_head_size()

    # ------------------------------------------------------------------ scheduler side
    @staticmethod
    def _plan(request: Request) -> TransferPlan | None:
        try:
            return TransferPlan.from_params(request.kv_transfer_params)
        except ValueError as e:
            log.warning("request %s: ignoring malformed kvaas plan: %s", request.request_id, e)
            return None

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        plan = self._plan(request)
        if plan is None or not plan.keys:
            return 0, False
        load_keys = plan.keys
        if plan.op == "save":
            self._saves.setdefault(request.request_id, _SaveState(plan, [], saved=plan.skip))
            if not plan.skip:
                return 0, False
            load_keys = plan.keys[: plan.skip]  # stored already: load them, save the rest
        n_prompt = len(request.prompt_token_ids or ())
        try:
            if self._store is None:
                n_chunks = len(load_keys)
            elif self._rank.world == 1:
                n_chunks = self._store.longest_prefix(list(load_keys))
            else:
                n_chunks = self._all_ranks_prefix(load_keys)
        except Exception as e:  # a store outage is a miss, never a failed request
            log.warning("request %s: store lookup failed: %s", request.request_id, e)
            n_chunks = 0
        bs = self._block_size
        matched = (min(n_chunks * plan.chunk_tokens, n_prompt - 1) // bs) * bs
        self._lookups[request.request_id] = (num_computed_tokens, matched)
        return max(0, matched - num_computed_tokens), False

    def _all_ranks_prefix(self, keys: tuple[ChunkKey, ...]) -> int:
        """Leading chunks of ``keys`` whose piece every rank of this engine's world holds."""
        assert self._store is not None
        world = self._rank.world
        found = self._store.exists_many(shard_keys(keys, self._rank.tp_size, self._rank.pp_size))
        for i in range(len(keys)):
            if not all(found[i * world : (i + 1) * world]):
                return i
        return len(keys)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens > 0:
            local, _ = self._lookups.get(request.request_id, (0, 0))
            self._pending_loads[request.request_id] = (
                request,
                local,
                local + num_external_tokens,
            )

    def _load_task(self, req_id: str, block_ids: list[int]) -> LoadTask | None:
        request, start, end = self._pending_loads.pop(req_id)
        plan = self._plan(request)
        if plan is None:
            return None
        return LoadTask(
            req_id, plan.keys, plan.chunk_tokens, start, end, tuple(block_ids), Sealing.of(plan)
        )

    def _save_tasks(self, req_id: str, done_tokens: int) -> SaveTask | None:
        st = self._saves[req_id]
        plan = st.plan
        complete = min(len(plan.keys), done_tokens // plan.chunk_tokens)
        if complete <= st.saved:
            return None
        task = SaveTask(
            req_id,
            plan.keys[st.saved : complete],
            st.saved,
            plan.chunk_tokens,
            plan.scheme,
            plan.storage_class,
            tuple(st.block_ids),
            Sealing.of(plan),
        )
        st.saved = complete
        return task

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVaaSConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            block_ids = list(new.block_ids[0])
            if new.req_id in self._pending_loads:
                task = self._load_task(new.req_id, block_ids)
                if task is not None:
                    meta.loads.append(task)
            st = self._saves.get(new.req_id)
            if st is not None:
                st.block_ids = block_ids
                done = new.num_computed_tokens + scheduled.get(new.req_id, 0)
                if (s := self._save_tasks(new.req_id, done)) is not None:
                    meta.saves.append(s)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            resumed = req_id in cached.resumed_req_ids
            if req_id in self._pending_loads and new_ids is not None:
                task = self._load_task(req_id, list(new_ids[0]))
                if task is not None:
                    meta.loads.append(task)
            st = self._saves.get(req_id)
            if st is None:
                continue
            if new_ids is not None:
                if resumed:
                    st.block_ids = list(new_ids[0])
                else:
                    st.block_ids.extend(new_ids[0])
            done = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            if (s := self._save_tasks(req_id, done)) is not None:
                meta.saves.append(s)
        self._pending_loads.clear()
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        _, matched = self._lookups.pop(rid, (0, 0))
        st = self._saves.pop(rid, None)
        self._pending_loads.pop(rid, None)
        short = self._short_loads.pop(rid, None)
        if st is None and matched == 0:
            return False, None
        report: dict[str, Any] = {
            "matched_tokens": matched,
            "saved_chunks": st.saved - st.plan.skip if st is not None else 0,
        }
        if short is not None:
            report["load_failed"] = True
            report["loaded_tokens"] = short
        return False, {"kvaas": report}

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take the engine's per-layer KV tensors; raises
        :class:`~kvaas.connector.paged.LayoutError` (the engine does not start) on a layout
        the connector cannot copy correctly (see
        :func:`~kvaas.connector.engine_layout.resolve_layout`)."""
        from vllm.model_executor.models.utils import extract_layer_index

        self._layers = sorted(kv_caches.items(), key=lambda kv: extract_layer_index(kv[0]))
        self._layout = resolve_layout(
            self._vllm_config, self._kv_cache_config, self._layers, self._kv_heads, self._head_dim
        )
        self._kv_views = [self._layout.keys_values(t) for _, t in self._layers]
        log.info(
            "KVaaS connector: %d layers, K/V placement %s, block size %d (kernel blocks of %d)",
            len(self._layers),
            self._layout.placement,
            self._block_size,
            self._layout.kernel_block_size,
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVaaSConnectorMetadata)
        for task in meta.loads:
            try:
                self._load(task)
            except Exception as e:  # never out of the worker: the whole load is recomputed
                log.error("request %s: loading chunks failed: %s", task.req_id, e)
                self._fail(task, task.start)

    def _load(self, task: LoadTask) -> None:
        """Load ``task``'s chunks into its blocks; chunks missing, unreadable or not of this
        engine's shape end the load there, and the rest is reported failed (recomputed)."""
        assert self._layout is not None
        c = task.chunk_tokens
        first, last = task.start // c, -(-task.end // c)
        t0 = time.perf_counter()
        assert self._store is not None
        try:
            keys = [shard_key(k, self._rank) for k in task.keys[first:last]]
            blobs = self._store.get_prefix(keys, task.sealing.sealer())
        except Exception as e:
            log.warning("request %s: chunk fetch failed: %s", task.req_id, e)
            blobs = []
        expected = ChunkShape(
            len(self._layers), c, self._kv_heads, self._head_dim, self._layers[0][1].dtype
        )
        chunks, refused = decode_fitting(blobs, expected)
        if refused is not None:
            log.warning("request %s: refused a stored chunk: %s", task.req_id, refused)
        loaded_end = min(task.end, (first + len(chunks)) * c)
        if loaded_end > task.start:
            kv = torch.cat(chunks, dim=2)  # [L, 2, n, H, D]
            kv = kv[:, :, task.start - first * c : loaded_end - first * c]
            blk, off = slots(task.block_ids, task.start, loaded_end, self._layout)
            for i, views in enumerate(self._kv_views):
                scatter(views, blk, off, kv[i])
        if loaded_end < task.end:
            self._fail(task, loaded_end)
            log.warning(
                "request %s: loaded %d of %d tokens; the rest is recomputed",
                task.req_id,
                max(0, loaded_end - task.start),
                task.end - task.start,
            )
        log.debug(
            "request %s: loaded tokens %d..%d in %.1f ms",
            task.req_id,
            task.start,
            loaded_end,
            (time.perf_counter() - t0) * 1e3,
        )

    def _fail(self, task: LoadTask, loaded_end: int) -> None:
        """Report tokens ``loaded_end .. task.end`` of ``task`` as not loaded: their blocks to
        vLLM (recomputed), the tokens loaded to the scheduler (``load_failed``)."""
        lo = max(task.start, loaded_end) // self._block_size
        hi = -(-task.end // self._block_size)
        self._failed_blocks.update(task.block_ids[lo:hi])
        self._short_loads[task.req_id] = max(task.start, loaded_end)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # chunks are saved whole, after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVaaSConnectorMetadata)
        for task in meta.saves:
            try:
                self._save(task)
            except Exception as e:  # the gateway sees the missing chunks and fails the create
                log.error("request %s: saving chunks failed: %s", task.req_id, e)

    def _save(self, task: SaveTask) -> None:
        assert self._layout is not None
        # No existence pre-check: a chunk another cache already stored may sit in a lower
        # tier than this cache's storage class asks for; tiers skip keys they hold.
        assert self._store is not None
        c = task.chunk_tokens
        items: list[tuple[ChunkKey, bytes]] = []
        for i in range(len(task.keys)):
            start = (task.first + i) * c
            blk, off = slots(task.block_ids, start, start + c, self._layout)
            kv = torch.stack([gather(views, blk, off) for views in self._kv_views])
            key = shard_key(task.keys[i], self._rank)
            items.append((key, codec.encode(kv.cpu().contiguous(), task.scheme)))
        self._store.put_chunks(items, task.storage_class, task.sealing.sealer())

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._short_loads:
            return None
        meta, self._short_loads = KVaaSWorkerMetadata(self._short_loads), {}
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KVaaSWorkerMetadata):
            # a short load makes vLLM recompute, so the request is still running here
            self._short_loads.update(meta.short_loads)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        if self._store is not None:
            self._store.close()
