"""Chunk saves off vLLM's step thread: stage on the step, encode, seal and store in the background.

``wait_for_save`` runs on the engine's step thread after the forward pass. Encoding a chunk
(:mod:`kvaas.codec`) and writing it to the store take tens of milliseconds each; done there,
every later step of every request (a concurrent attach's first token included) waits for them.
With a queue bound above 0 (see :func:`queue_bytes`; 0, synchronous, is the default) the step
thread only *stages* each completed chunk and hands it to one background thread:

- **Staging copies the KV out of the paged blocks** (:meth:`Stager.stage`): on CPU the gather
  is itself a copy into a fresh contiguous tensor; on a CUDA device the gather runs on the
  device (into a fresh device tensor, ordered on the current stream before any later write to
  the blocks), then a non-blocking copy on a side stream moves it into a pinned host buffer
  from a small pool, with an event the background thread waits on before encoding.

  Why a copy, not vLLM's delayed free (``request_finished`` returning ``True`` until
  ``get_finished`` reports the request's blocks sent): the copy is cheap next to the encode
  (a few hundred kB per chunk for small models, a device gather plus a PCIe copy on a GPU),
  it frees the blocks at once, so a busy engine never holds finished requests' blocks while a
  queue drains, and it keeps the save independent of what later steps write into those
  blocks. Delayed free would also not make the request's report honest: vLLM 0.32 emits a
  finished request's output (with its ``kv_transfer_params``) in the step it stops, delayed
  free or not; only the blocks are held.

- **Back-pressure**: staged bytes waiting or being encoded are bounded by ``max_pending_bytes``.
  :meth:`Saver.submit` blocks the step (never drops a save, never grows without bound) while
  the bound would be exceeded; a single job larger than the bound is admitted when nothing
  else is pending, so it cannot deadlock.

- **Order and results**: one thread runs jobs in submission order, so a request's chunks
  become durable in order; :meth:`Saver.take_results` hands the connector, per request, the
  chunk index up to which every chunk is stored, and the requests whose save failed. A failed
  save is logged and its chunks are absent from the store, exactly as a failed synchronous save
  was (the gateway finds them missing and fails the create).

- **Synchronous mode**: ``max_pending_bytes == 0`` runs each job inline on the calling thread
  (the behaviour before this module: the step waits for encode and store).

- **Reports**: the worker tells the scheduler, through its worker metadata, up to which chunk
  each request's chunks are stored and whose save failed (:class:`SaveState`); the report in a
  finished request's ``kv_transfer_params["kvaas"]`` claims only those: ``saved_chunks``
  (stored), ``pending_chunks`` (handed over, not yet known stored: vLLM emits a request's
  output in the step it stops, before its queued saves land) and ``save_failed``. A gateway
  that sees ``pending_chunks`` waits for the chunks to appear in the store before it calls the
  cache ready. With synchronous saves ``pending_chunks`` is 0.

- :meth:`Saver.close` drains the queue (every job submitted is stored or has failed) before it
  returns.

Settings: ``save_queue_bytes`` in ``kv_connector_extra_config``, else the environment variable
:data:`QUEUE_BYTES_ENV`, else :data:`DEFAULT_QUEUE_BYTES` (see :func:`queue_bytes`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kvaas import codec
from kvaas.connector import byte_budget
from kvaas.connector.params import TransferPlan
from kvaas.store.crypto import ChunkSealer
from kvaas.store.keys import ChunkKey
from kvaas.store.sync import SyncTieredStore

log = logging.getLogger("kvaas.connector")

#: the save queue bound when none is configured: 0, synchronous saves (the step waits)
DEFAULT_QUEUE_BYTES = 0
#: a bound that suits background saves: staged bytes held before a step waits for room
RECOMMENDED_QUEUE_BYTES = 64 * 1024**2
#: environment variable read when ``kv_connector_extra_config`` has no ``save_queue_bytes``
QUEUE_BYTES_ENV = "KVAAS_SAVE_QUEUE_BYTES"
#: pinned host buffers kept for reuse, per chunk shape and dtype (GPU staging)
PINNED_POOL_PER_SHAPE = 8

Encoder = Callable[[torch.Tensor, str], bytes]


def queue_bytes(extra: Mapping[str, Any] | None) -> int:
    """The save queue bound of a connector: ``extra["save_queue_bytes"]`` when present, else
    ``$KVAAS_SAVE_QUEUE_BYTES``, else :data:`DEFAULT_QUEUE_BYTES`; ``0`` means synchronous
    saves. Raises ``ValueError`` on a negative or non-integer value."""
    return byte_budget(extra, "save_queue_bytes", QUEUE_BYTES_ENV, DEFAULT_QUEUE_BYTES)


@dataclass
class SaveJob:
    """Store chunks of one request: ``chunks`` are ``(store key, staged KV [L, 2, n, H, D])``;
    ``end`` is the request's chunk index after the last of them (the plan's numbering).
    ``ready`` (when set) waits until the staged tensors hold their data (a device copy);
    ``release`` (when set) runs after the job, done or failed (returns staging buffers)."""

    req_id: str
    end: int
    chunks: list[tuple[ChunkKey, torch.Tensor]]
    scheme: str
    storage_class: str
    sealer: ChunkSealer | None
    ready: Callable[[], None] | None = None
    release: Callable[[], None] | None = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(kv.numel() * kv.element_size() for _, kv in self.chunks)


class Stager:
    """Copies chunks out of the engine's paged KV so the blocks can be reused at once (see the
    module docstring). On CPU :meth:`stage` returns its argument (already a copy)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._stream: Any = None

    def stage(
        self, kv: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[], None] | None, Callable[[], None] | None]:
        """``(host tensor, ready, release)`` for ``kv``, a fresh gather of one chunk made on
        the step thread: on CPU ``kv`` itself (contiguous) and no callbacks; on CUDA a pinned
        host buffer filled by a non-blocking copy on a side stream, ``ready`` waiting for that
        copy's event and ``release`` returning the buffer to the pool."""
        if kv.device.type != "cuda":
            return kv.contiguous(), None, None
        return self._stage_cuda(kv)

    def _stage_cuda(
        self, kv: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[], None], Callable[[], None]]:  # pragma: no cover - GPU
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=kv.device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(kv.device))  # the gather first
        host = self._take(tuple(kv.shape), kv.dtype)
        with torch.cuda.stream(stream):
            host.copy_(kv, non_blocking=True)
            kv.record_stream(stream)  # keep the device gather alive until the copy ran
            event = torch.cuda.Event()
            event.record(stream)
        return host, event.synchronize, lambda: self._give(host)

    def _take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._pool.get((shape, dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _give(self, host: torch.Tensor) -> None:
        with self._lock:
            free = self._pool.setdefault((tuple(host.shape), host.dtype), [])
            if len(free) < PINNED_POOL_PER_SHAPE:
                free.append(host)


class Saver:
    """Encodes, seals and stores :class:`SaveJob` s on one background thread (inline when
    ``max_pending_bytes`` is 0). Thread-safe: :meth:`submit` from the step thread,
    :meth:`take_results` from any thread."""

    def __init__(
        self,
        store: SyncTieredStore,
        max_pending_bytes: int = RECOMMENDED_QUEUE_BYTES,
        *,
        encode: Encoder = codec.encode,
        warm: bool = True,
    ) -> None:
        """``warm``: also keep saved chunks in the worker's own memory tier (see
        :meth:`~kvaas.store.tiered.TieredStore.put_chunks`)."""
        self._store = store
        self._warm = warm
        self.max_pending_bytes = max_pending_bytes
        self._encode = encode
        self._cv = threading.Condition()
        self._queue: deque[SaveJob] = deque()
        self._pending_bytes = 0  # queued + running
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._durable: dict[str, int] = {}  # since the last take_results
        self._failed: set[str] = set()
        self._broken: set[str] = set()  # requests with a failed save: durable no more
        #: set while a :meth:`submit` waits for room (back-pressure), for observers and tests
        self.waiting_for_room = threading.Event()

    @property
    def asynchronous(self) -> bool:
        return self.max_pending_bytes > 0

    @property
    def pending_bytes(self) -> int:
        """Staged bytes queued or being encoded and stored."""
        with self._cv:
            return self._pending_bytes

    def submit(self, job: SaveJob) -> None:
        """Queue ``job`` (run it now when synchronous). Blocks while the staged bytes would
        exceed the bound; raises ``RuntimeError`` after :meth:`close`."""
        if not self.asynchronous:
            self._run(job)
            return
        with self._cv:
            if self._closed:
                raise RuntimeError("the saver is closed")
            while self._pending_bytes and self._pending_bytes + job.nbytes > self.max_pending_bytes:
                self.waiting_for_room.set()
                self._cv.wait()
            self.waiting_for_room.clear()
            self._pending_bytes += job.nbytes
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kvaas-saver", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def take_results(self) -> tuple[dict[str, int], set[str]]:
        """Since the last call: per request, the chunk index below which all its submitted
        chunks are stored; and the requests a save failed for."""
        with self._cv:
            durable, self._durable = self._durable, {}
            failed, self._failed = self._failed, set()
        return durable, failed

    def forget(self, req_ids: set[str]) -> None:
        """Drop what is remembered of finished requests (their failed saves)."""
        with self._cv:
            self._broken -= req_ids

    def drain(self) -> None:
        """Wait until every job submitted so far has been stored or has failed."""
        with self._cv:
            while self._queue or self._running:
                self._cv.wait()

    def close(self) -> None:
        """Drain the queue, then stop the thread; later :meth:`submit` s raise."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join()

    # -- the background thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:  # closed and drained
                    return
                job = self._queue.popleft()
                self._running = True
            try:
                self._run(job)
            finally:
                with self._cv:
                    self._running = False
                    self._pending_bytes -= job.nbytes
                    self._cv.notify_all()

    def _run(self, job: SaveJob) -> None:
        """Encode, seal and store ``job``; record the outcome. Never raises."""
        try:
            if job.ready is not None:
                job.ready()
            items = [(key, self._encode(kv, job.scheme)) for key, kv in job.chunks]
            # No existence pre-check: a chunk another cache already stored may sit in a lower
            # tier than this cache's storage class asks for; tiers skip keys they hold.
            # the node's own memory tier too: routing sends the cache's attaches back here
            self._store.put_chunks(items, job.storage_class, job.sealer, warm=self._warm)
        except Exception as e:  # the gateway sees the missing chunks and fails the create
            log.error("request %s: saving chunks failed: %s", job.req_id, e)
            with self._cv:
                self._failed.add(job.req_id)
                self._broken.add(job.req_id)
                self._durable.pop(job.req_id, None)
        else:
            with self._cv:
                if job.req_id not in self._broken:  # an earlier chunk is missing: not durable
                    self._durable[job.req_id] = max(self._durable.get(job.req_id, 0), job.end)
        finally:
            if job.release is not None:
                job.release()


class Plan(Protocol):
    """What a save needs of its plan (a connector ``SaveTask``)."""

    @property
    def scheme(self) -> str: ...

    @property
    def storage_class(self) -> str: ...


def stage_job(
    stager: Stager,
    req_id: str,
    end: int,
    gathered: Sequence[tuple[ChunkKey, torch.Tensor]],
    plan: Plan,
    sealer: ChunkSealer | None,
) -> SaveJob:
    """The job storing ``gathered`` (store key, fresh gather of one chunk's KV), each staged
    by ``stager``; ``end``: the request's chunk index after the last of them."""
    chunks: list[tuple[ChunkKey, torch.Tensor]] = []
    readies: list[Callable[[], None]] = []
    releases: list[Callable[[], None]] = []
    for key, kv in gathered:
        host, ready, release = stager.stage(kv)
        chunks.append((key, host))
        if ready is not None:
            readies.append(ready)
        if release is not None:
            releases.append(release)

    def ready_all() -> None:
        for r in readies:
            r()

    def release_all() -> None:
        for r in releases:
            r()

    ready = ready_all if readies else None
    release = release_all if releases else None
    return SaveJob(req_id, end, chunks, plan.scheme, plan.storage_class, sealer, ready, release)


@dataclass
class SaveState:
    """The scheduler's record of one request with a ``save`` plan."""

    plan: TransferPlan
    block_ids: list[int]
    saved: int = 0  # chunks already handed to the worker (or stored before: the plan's skip)
    durable: dict[int, int] = field(default_factory=dict)  # rank -> chunks stored below
    failed: bool = False

    def record(self, ranks: Mapping[int, int] | None, failed: bool) -> None:
        """Take a worker report: per rank, the chunk index below which it stored this
        request's chunks; whether a save failed."""
        for rank, end in (ranks or {}).items():
            self.durable[rank] = max(end, self.durable.get(rank, end))
        self.failed = self.failed or failed

    def report(self, *, asynchronous: bool, world: int) -> dict[str, Any]:
        """``saved_chunks`` (known stored by every rank), ``pending_chunks`` (handed over, not
        yet known stored) and ``save_failed`` (only when one failed)."""
        stored = self.saved
        if asynchronous:
            stored = min(stored, *(self.durable.get(r, self.plan.skip) for r in range(world)))
        out: dict[str, Any] = {
            "saved_chunks": stored - self.plan.skip,
            "pending_chunks": 0 if self.failed else self.saved - stored,
        }
        if self.failed:
            out["save_failed"] = True
        return out


def merge_saved(
    a: Mapping[str, Mapping[int, int]], b: Mapping[str, Mapping[int, int]]
) -> dict[str, dict[int, int]]:
    """Two workers' ``saved`` reports (request -> rank -> stored below) as one."""
    out = {rid: dict(ranks) for rid, ranks in a.items()}
    for rid, ranks in b.items():
        mine = out.setdefault(rid, {})
        for rank, end in ranks.items():
            mine[rank] = max(end, mine.get(rank, end))
    return out
