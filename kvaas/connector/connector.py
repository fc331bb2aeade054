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
existence check over the shared tiers; none for a plan the gateway marked ``checked``, see
:class:`~kvaas.connector.params.TransferPlan`) and reports that many tokens, capped so that at
least one prompt token is computed and aligned down to the engine's block size. Every step,
``build_connector_meta`` turns allocations into :class:`LoadTask` s and, for ``save`` plans,
turns chunks whose tokens this step completes into :class:`SaveTask` s. The metadata is the
only channel to the worker side.

**Worker side**: ``start_load_kv`` fetches a request's chunks concurrently from the tiers,
opens them with the plan's tenant keys (:class:`~kvaas.store.crypto.ChunkSealer`: AES-GCM,
bound to each chunk's key, the model fingerprint and the scheme), checks each chunk's header
against this engine's layers, KV heads, head size, dtype and the plan's chunk size, and decodes
them straight into the request's paged blocks before the forward pass
(:class:`~kvaas.connector.attach.PagedLoader`: reused staging buffers, one block copy per
layer; each chunk's checksum is verified once, by the store). Before the store, the worker asks
its pre-decoded tier (:mod:`kvaas.connector.decoded`: chunks kept in the engine's dtype and
staging layout, ``decoded_bytes`` in ``kv_connector_extra_config``, 0: off): the leading
chunks it holds are copied, not fetched and decoded, and the store is asked for the rest only.
Chunks that came from the store are promoted into it afterwards on a background thread, never
on the request's path. With ``layerwise_loads`` (in ``kv_connector_extra_config``; off by
default) ``start_load_kv`` returns at once: the step's loads run on a background thread that
copies each layer into the blocks in turn, ``wait_for_layer_load`` waits for its layer only,
and the step's loads are all done (failed blocks included) before ``wait_for_save``,
``get_block_ids_with_load_errors`` or ``build_connector_worker_meta`` return
(:mod:`kvaas.connector.layerwise`). Each load's per-stage times
(store fetch per tier, verify, decode, copy, and the scheduler's lookup) reach the request's
``kvaas`` report as ``load_ms`` (:mod:`kvaas.connector.timings`). A chunk that is missing,
corrupt, fails authentication, does not fit or does not decode ends the load: it and every
chunk after it are reported through ``get_block_ids_with_load_errors`` and vLLM recomputes
them (``kv_load_failure_policy = "recompute"``); nothing a stored chunk holds raises out of
the worker. ``wait_for_save`` runs after the step's forward pass: it copies the completed
chunks' KV out of the paged blocks and hands them to the saver (:mod:`kvaas.connector.saver`),
which encodes each chunk with the plan's scheme, seals it and writes it: on a background
thread when ``save_queue_bytes`` (in ``kv_connector_extra_config``, or
``$KVAAS_SAVE_QUEUE_BYTES`` for a connector configured without it; the gateway passes
``KVAAS_CONNECTOR_SAVE_QUEUE_BYTES``) is above 0, the step waiting only while that bounded queue is
full; on the step thread otherwise (the default). The worker never sees a master key: the
plan carries the tenant's derived keys (see :mod:`kvaas.store.crypto`).

A request may finish before its queued chunks are stored: its report claims only the chunks
known stored (see :class:`~kvaas.connector.saver.SaveState`).

Layouts and sharding: at start-up the worker takes each layer's K/V placement from its
attention backend and refuses layouts it cannot copy (:mod:`kvaas.connector.engine_layout`,
:mod:`kvaas.connector.paged`). In a tensor- or pipeline-parallel engine each worker reads and
writes its share of a chunk under its shard key (:func:`kvaas.store.keys.shard_key`; the plan's
key itself in a world of one), and the scheduler counts a chunk only when every rank's piece is
stored.

Why this module passes 500 lines (about 750): vLLM's connector API is one class with a
scheduler half and a worker half that share their metadata types; the machinery each half uses
lives in its own module (:mod:`~kvaas.connector.attach`, :mod:`~kvaas.connector.saver`,
:mod:`~kvaas.connector.decoded`, :mod:`~kvaas.connector.layerwise`,
:mod:`~kvaas.connector.presence`, :mod:`~kvaas.connector.timings`,
:mod:`~kvaas.connector.paged`), and what stays here is the bookkeeping between the two.

Partial trailing chunk: a plan whose ``tail`` is above 0 names the prompt's last
``len(prompt) % chunk_tokens`` tokens with its last key. They are saved once the prompt's
computed tokens reach them and loaded after every full chunk, as a chunk of their own length
(the pre-decoded tier holds it with that shape too), so an attach recomputes only what the
engine must (its block-aligned remainder and the request's own tokens).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvaas.connector import store_config
from kvaas.connector.attach import PagedLoader
from kvaas.connector.chunks import ChunkShape
from kvaas.connector.decoded import DecodedChunk, DecodedChunks, Promoter, decoded_bytes
from kvaas.connector.engine_layout import resolve_layout, shard_rank
from kvaas.connector.layerwise import LayerwiseLoads, device_order
from kvaas.connector.paged import PagedLayout, gather, slots
from kvaas.connector.params import TransferPlan
from kvaas.connector.presence import DEFAULT_TTL_S, PresenceCache
from kvaas.connector.saver import (
    SaveJob,
    Saver,
    SaveState,
    Stager,
    merge_saved,
    queue_bytes,
    stage_job,
)
from kvaas.connector.timings import REPORT_KEY, StageClock, merge_ms
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
    """Load tokens ``[start, end)`` of a request from ``keys`` (the plan's chunk keys; the last
    one names a partial chunk of ``tail`` tokens when ``tail`` is above 0)."""

    req_id: str
    keys: tuple[ChunkKey, ...]
    chunk_tokens: int
    start: int
    end: int
    block_ids: tuple[int, ...]
    sealing: Sealing
    tail: int = 0


@dataclass(frozen=True, slots=True)
class SaveTask:
    """Store chunks ``first .. first + len(keys) - 1`` of a request (the last one a partial
    chunk of ``tail`` tokens when ``tail`` is above 0)."""

    req_id: str
    keys: tuple[ChunkKey, ...]
    first: int
    chunk_tokens: int
    scheme: str
    storage_class: str
    block_ids: tuple[int, ...]
    sealing: Sealing
    tail: int = 0

    def chunk_tokens_of(self, i: int) -> int:
        """Tokens of the task's ``i``-th chunk."""
        return self.tail if self.tail and i == len(self.keys) - 1 else self.chunk_tokens


@dataclass
class KVaaSConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadTask] = field(default_factory=list)
    saves: list[SaveTask] = field(default_factory=list)


@dataclass
class KVaaSWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker → scheduler: requests whose load fell short, with the tokens actually loaded
    (counted from the request's first token); each load's per-stage times in ms
    (:mod:`kvaas.connector.timings`); per request and worker rank (``pp_rank * tp_size +
    tp_rank``), the plan's chunk index below which that rank's chunks are stored; requests a
    save failed for."""

    short_loads: dict[str, int] = field(default_factory=dict)
    load_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    saved: dict[str, dict[int, int]] = field(default_factory=dict)
    save_failed: set[str] = field(default_factory=set)
    #: per request, the tokens of its load that the worker's in-process tiers served (its
    #: memory tier of stored blobs and its pre-decoded tier)
    memory_tokens: dict[str, int] = field(default_factory=dict)
    #: per request, the tokens of its load that the worker's pre-decoded tier served
    decoded_tokens: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVaaSWorkerMetadata)
        merged = dict(self.short_loads)
        for rid, n in other.short_loads.items():
            merged[rid] = min(n, merged.get(rid, n))
        times = dict(self.load_ms)
        for rid, ms in other.load_ms.items():
            times[rid] = merge_ms(times[rid], ms) if rid in times else dict(ms)
        saved = merge_saved(self.saved, other.saved)
        memory = _least(self.memory_tokens, other.memory_tokens)  # only if by every rank
        decoded = _least(self.decoded_tokens, other.decoded_tokens)
        return KVaaSWorkerMetadata(
            merged, times, saved, self.save_failed | other.save_failed, memory, decoded
        )


def _least(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Per request, the smaller count of two ranks' (a request missing from one: the other's)."""
    out = dict(a)
    for rid, n in b.items():
        out[rid] = min(n, out.get(rid, n))
    return out


class _TierHits:
    """Chunks of one load served per tier (the store's ``found`` callback; ``decoded`` for
    the worker's pre-decoded tier)."""

    def __init__(self) -> None:
        self.chunks: dict[str, int] = {}

    def add(self, tier: str, n: int) -> None:
        self.chunks[tier] = self.chunks.get(tier, 0) + n

    def tokens(self, tier: str, chunk_tokens: int) -> int:
        return self.chunks.get(tier, 0) * chunk_tokens


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
        transfer = vllm_config.kv_transfer_config
        extra_config = (transfer.kv_connector_extra_config if transfer is not None else None) or {}
        self._queue_bytes = queue_bytes(extra_config)
        self._decoded_bytes = decoded_bytes(extra_config)
        self._layerwise = bool(extra_config.get("layerwise_loads", False))
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
        self._lookup_keys: dict[str, tuple[ChunkKey, ...]] = {}  # req -> keys it looked up
        extra = getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {}
        self._presence = PresenceCache(float(extra.get("presence_ttl_s", DEFAULT_TTL_S)))
        self._lookup_s: dict[str, float] = {}  # req -> seconds its store lookups took
        self._load_ms: dict[str, dict[str, float]] = {}  # req -> the worker's stage times
        self._memory_tokens: dict[str, int] = {}  # req -> tokens its worker's memory served
        self._decoded_tokens: dict[str, int] = {}  # req -> of which from the decoded tier
        # reports returned by request_finished since the last step's worker output: the
        # worker's times of a load finished in the same step arrive after request_finished
        # (update_connector_output runs after it) and are added to the report then
        self._open_reports: dict[str, dict[str, Any]] = {}
        self._pending_loads: dict[str, tuple[Request, int, int]] = {}
        self._saves: dict[str, SaveState] = {}
        # worker state
        self._layers: list[tuple[str, torch.Tensor]] = []
        self._kv_views: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: (K, V)
        self._layout: PagedLayout | None = None
        self._loader: PagedLoader | None = None
        self._failed_blocks: set[int] = set()
        self._short_loads: dict[str, int] = {}  # worker: this step's; scheduler: all seen
        self._load_times: dict[str, dict[str, float]] = {}  # worker: this step's loads
        self._load_memory: dict[str, int] = {}  # worker: this step's in-process tier tokens
        self._load_decoded: dict[str, int] = {}  # worker: this step's decoded-tier tokens
        self._decoded: DecodedChunks | None = None  # worker: the pre-decoded tier, if on
        self._promoter: Promoter | None = None
        self._layerwise_loads: LayerwiseLoads | None = None  # worker: when layer-wise loads
        self._layer_index: dict[str, int] = {}  # worker: layer name -> index in _layers
        self._saver: Saver | None = None
        self._save_failures: set[str] = set()  # staging failures of this step
        self._stager = Stager()
        if role == KVConnectorRole.WORKER:
            assert self._store is not None
            warm = bool(extra_config.get("warm_on_save", True))
            self._saver = Saver(self._store, self._queue_bytes, warm=warm)
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
            self._saves.setdefault(request.request_id, SaveState(plan, [], saved=plan.skip))
            if not plan.skip:
                return 0, False
            load_keys = plan.keys[: plan.skip]  # stored already: load them, save the rest
        n_prompt = len(request.prompt_token_ids or ())
        t0 = time.perf_counter()
        try:
            # the gateway found every key of a checked plan just now (TransferPlan.checked):
            # trusted, unless a load of this request has already come up short
            checked = plan.checked and request.request_id not in self._short_loads
            if self._store is None or checked:  # a chunk the worker misses is recomputed
                n_chunks = len(load_keys)
            else:  # only keys after those recently found present cost a store lookup
                known = self._presence.leading(load_keys)
                rest = load_keys[known:]
                if not rest:
                    n = 0
                elif self._rank.world == 1:
                    n = self._store.longest_prefix(list(rest))
                else:
                    n = self._all_ranks_prefix(rest)
                self._presence.remember(rest[:n])
                n_chunks = known + n
            self._lookup_keys[request.request_id] = load_keys
        except Exception as e:  # a store outage is a miss, never a failed request
            log.warning("request %s: store lookup failed: %s", request.request_id, e)
            n_chunks = 0
        rid = request.request_id
        self._lookup_s[rid] = self._lookup_s.get(rid, 0.0) + time.perf_counter() - t0
        bs = self._block_size
        matched = (min(plan.tokens_in(n_chunks), n_prompt - 1) // bs) * bs
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
            req_id,
            plan.keys,
            plan.chunk_tokens,
            start,
            end,
            tuple(block_ids),
            Sealing.of(plan),
            plan.tail,
        )

    def _save_tasks(self, req_id: str, done_tokens: int) -> SaveTask | None:
        st = self._saves[req_id]
        plan = st.plan
        complete = plan.chunks_within(done_tokens)
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
            plan.tail if complete == len(plan.keys) else 0,
        )
        st.saved = complete
        return task

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        self._open_reports.clear()  # the step that finished them has reported
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
        self._lookup_keys.pop(rid, None)
        st = self._saves.pop(rid, None)
        self._pending_loads.pop(rid, None)
        short = self._short_loads.pop(rid, None)
        lookup_s = self._lookup_s.pop(rid, None)
        load_ms = self._load_ms.pop(rid, None)
        memory_tokens = self._memory_tokens.pop(rid, None)
        decoded_tokens = self._decoded_tokens.pop(rid, None)
        if st is None and matched == 0:
            return False, None
        report: dict[str, Any] = {"matched_tokens": matched, "saved_chunks": 0}
        if st is not None:  # claim only what is stored: background saves may still be queued
            report.update(st.report(asynchronous=self._queue_bytes > 0, world=self._rank.world))
        if memory_tokens is not None:
            report["memory_tokens"] = memory_tokens
        if decoded_tokens is not None:
            report["decoded_tokens"] = decoded_tokens
        if short is not None:
            report["load_failed"] = True
            report["loaded_tokens"] = short
        times: dict[str, float] = dict(load_ms or {})
        if lookup_s is not None:
            times["lookup"] = round(lookup_s * 1e3, 3)
        if times:
            report[REPORT_KEY] = times
        if matched > 0 and load_ms is None:
            self._open_reports[rid] = report  # the worker's times may come with this step
        return False, {"kvaas": report}

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take the engine's per-layer KV tensors; raises
        :class:`~kvaas.connector.paged.LayoutError` (the engine does not start) on a layout
        the connector cannot copy correctly (see
        :func:`~kvaas.connector.engine_layout.resolve_layout`)."""
        from vllm.model_executor.models.utils import extract_layer_index

        self._layers = sorted(kv_caches.items(), key=lambda kv: extract_layer_index(kv[0]))
        self._layer_index = {name: i for i, (name, _) in enumerate(self._layers)}
        self._layout = resolve_layout(
            self._vllm_config, self._kv_cache_config, self._layers, self._kv_heads, self._head_dim
        )
        self._kv_views = [self._layout.keys_values(t) for _, t in self._layers]
        self._loader = PagedLoader(self._layout, self._kv_views)
        if self._decoded_bytes > 0:
            self._decoded = DecodedChunks(self._decoded_bytes)
            self._promoter = Promoter(self._decoded, self._loader.device)
        if self._layerwise:
            self._layerwise_loads = LayerwiseLoads(
                len(self._layers), order=device_order(self._loader.device)
            )
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
        if self._layerwise_loads is not None:
            if meta.loads:
                loads = list(meta.loads)
                self._layerwise_loads.start(lambda mark: self._load_all(loads, mark))
            return
        self._load_all(meta.loads)

    def _load_all(
        self, tasks: list[LoadTask], on_layer: Callable[[int], None] | None = None
    ) -> None:
        """Run ``tasks`` in order; ``on_layer(i)`` once layer ``i`` of every task is in the
        blocks (the last task's copy reports its layers: the tasks before it are done)."""
        for n, task in enumerate(tasks):
            try:
                self._load(task, on_layer if n == len(tasks) - 1 else None)
            except Exception as e:  # never out of the worker: the whole load is recomputed
                log.error("request %s: loading chunks failed: %s", task.req_id, e)
                self._fail(task, task.start)

    def _finish_loads(self) -> None:
        """Wait until the step's layer-wise loads are done (no-op when none are in flight)."""
        if self._layerwise_loads is not None:
            self._layerwise_loads.finish()

    def _load(self, task: LoadTask, on_layer: Callable[[int], None] | None = None) -> None:
        """Load ``task``'s chunks into its blocks; chunks missing, unreadable or not of this
        engine's shape end the load there, and the rest is reported failed (recomputed).
        Stage times go to the scheduler with the step's worker metadata."""
        assert self._loader is not None and self._store is not None
        c = task.chunk_tokens
        first, last = task.start // c, -(-task.end // c)
        clock = StageClock()
        hits = _TierHits()
        t0 = time.perf_counter()
        expected = ChunkShape(
            len(self._layers), c, self._kv_heads, self._head_dim, self._loader.dtype
        )
        keys = [shard_key(k, self._rank) for k in task.keys[first:last]]
        # the prompt's partial last chunk, when this load reaches it: a shape of its own
        tail = (last - 1 - first, task.tail) if task.tail and last == len(task.keys) else None
        tail_shape = replace(expected, num_tokens=task.tail) if tail is not None else None
        decoded: list[DecodedChunk] = []
        if self._decoded is not None:
            full = keys[:-1] if tail_shape is not None else keys
            decoded = self._decoded.prefix(full, expected)
            if tail_shape is not None and len(decoded) == len(full):
                decoded += self._decoded.prefix(keys[-1:], tail_shape)
        hits.add("decoded", len(decoded))
        rest = keys[len(decoded) :]
        blobs: list[bytes] = []
        try:
            if rest:
                with clock.time("store"):
                    blobs = self._store.get_prefix(rest, task.sealing.sealer(), clock.add, hits.add)
        except Exception as e:
            log.warning("request %s: chunk fetch failed: %s", task.req_id, e)
        try:
            done = self._loader.load(
                blobs,
                expected,
                first * c,
                task.start,
                task.end,
                task.block_ids,
                clock,
                decoded,
                on_layer,
                tail,
            )
        finally:
            clock.add("load", time.perf_counter() - t0)
            self._load_times[task.req_id] = clock.as_ms()
            in_process = hits.tokens("memory", c) + hits.tokens("decoded", c)
            named = (last - first) * c - (c - tail[1] if tail is not None else 0)
            self._load_memory[task.req_id] = min(in_process, named)  # a partial chunk's own
            self._load_decoded[task.req_id] = min(hits.tokens("decoded", c), named)
        if self._promoter is not None and (n := done.blobs_decoded):  # in the background
            promoted = list(zip(rest[:n], blobs[:n], strict=True))
            if tail is not None and tail_shape is not None and len(decoded) + n > tail[0]:
                self._promoter.submit(promoted[-1:], tail_shape)  # the partial last chunk
                promoted = promoted[:-1]
            self._promoter.submit(promoted, expected)
        if done.refused is not None:
            log.warning("request %s: refused a stored chunk: %s", task.req_id, done.refused)
        if done.end < task.end:
            self._fail(task, done.end)
            log.warning(
                "request %s: loaded %d of %d tokens; the rest is recomputed",
                task.req_id,
                done.end - task.start,
                task.end - task.start,
            )

    def _fail(self, task: LoadTask, loaded_end: int) -> None:
        """Report tokens ``loaded_end .. task.end`` of ``task`` as not loaded: their blocks to
        vLLM (recomputed), the tokens loaded to the scheduler (``load_failed``)."""
        lo = max(task.start, loaded_end) // self._block_size
        hi = -(-task.end // self._block_size)
        self._failed_blocks.update(task.block_ids[lo:hi])
        self._short_loads[task.req_id] = max(task.start, loaded_end)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """With layer-wise loads: return once this step's loads have written ``layer_name``'s
        blocks (at once otherwise, and for a layer the connector does not hold)."""
        if self._layerwise_loads is not None and self._layerwise_loads.in_flight:
            i = self._layer_index.get(layer_name)
            if i is not None:
                self._layerwise_loads.wait_layer(i)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # chunks are saved whole, after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        """Copy this step's completed chunks out of the paged blocks and hand them to the
        saver; returns once they are staged (waits only while the saver's queue is full, or
        for the whole save when saves are synchronous). Layer-wise loads of the step are
        finished first."""
        self._finish_loads()
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVaaSConnectorMetadata)
        assert self._saver is not None
        for task in meta.saves:
            try:
                job = self._save(task)
            except Exception as e:  # the gateway sees the missing chunks and fails the create
                log.error("request %s: saving chunks failed: %s", task.req_id, e)
                self._save_failures.add(task.req_id)
                continue
            self._saver.submit(job)

    def _save(self, task: SaveTask) -> SaveJob:
        """Stage ``task``'s chunks (a copy: the blocks may be reused once this returns)."""
        assert self._layout is not None
        c, first, gathered = task.chunk_tokens, task.first, []
        for i, key in enumerate(task.keys):
            start = (first + i) * c
            end = start + task.chunk_tokens_of(i)
            blk, off = slots(task.block_ids, start, end, self._layout)
            kv = torch.stack([gather(views, blk, off) for views in self._kv_views])
            gathered.append((shard_key(key, self._rank), kv))
        end = first + len(task.keys)
        sealer = task.sealing.sealer()
        return stage_job(self._stager, task.req_id, end, gathered, task, sealer)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        self._finish_loads()
        durable, failed = self._saver.take_results() if self._saver is not None else ({}, set())
        failed |= self._save_failures
        self._save_failures = set()
        if not (self._short_loads or self._load_times or durable or failed):
            return None
        memory, self._load_memory = self._load_memory, {}
        decoded, self._load_decoded = self._load_decoded, {}
        rank = self._rank.pp_rank * self._rank.tp_size + self._rank.tp_rank
        saved = {rid: {rank: end} for rid, end in durable.items()}
        meta = KVaaSWorkerMetadata(
            self._short_loads, self._load_times, saved, failed, memory, decoded
        )
        self._short_loads, self._load_times = {}, {}
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KVaaSWorkerMetadata):
            # a short load makes vLLM recompute, so the request is still running here
            self._short_loads.update(meta.short_loads)
            for rid in meta.short_loads:  # what it promised may be gone: ask the store again
                self._presence.forget(self._lookup_keys.get(rid, ()))
            for name, counts, pending in (
                ("memory_tokens", meta.memory_tokens, self._memory_tokens),
                ("decoded_tokens", meta.decoded_tokens, self._decoded_tokens),
            ):
                for rid, n in counts.items():
                    if (open_report := self._open_reports.get(rid)) is not None:
                        open_report[name] = n  # finished this step
                    elif rid in self._lookups:  # still running: for request_finished
                        pending[rid] = n
            for rid, ms in meta.load_ms.items():
                report = self._open_reports.pop(rid, None)
                if report is not None:  # finished this step: complete its report
                    report[REPORT_KEY] = {**ms, **report.get(REPORT_KEY, {})}
                elif rid in self._lookups:  # still running: for request_finished
                    self._load_ms[rid] = ms
            for rid, st in self._saves.items():  # requests finished meanwhile: ignored
                st.record(meta.saved.get(rid), rid in meta.save_failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """No delayed frees (saves copy the KV out of the blocks): only forget finished
        requests' save failures."""
        if self._saver is not None and finished_req_ids:
            self._saver.forget(finished_req_ids)
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_loads()  # a layer-wise load's failures are known once it is done
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        """Finish the layer-wise loads in flight and stop their thread; store every queued
        save (drain the saver), then close the store; stop promotion and clear the
        pre-decoded tier."""
        if self._layerwise_loads is not None:
            self._layerwise_loads.close()
        if self._promoter is not None:
            self._promoter.close()
        if self._decoded is not None:
            self._decoded.clear()
        if self._saver is not None:
            self._saver.close()
        if self._store is not None:
            self._store.close()
