"""The worker's pre-decoded memory tier: the hottest chunks kept decoded, so a hit is one copy.

:class:`DecodedChunks` maps a chunk's key (the shard key the worker fetches, see
:func:`kvaas.store.keys.shard_key`) to the chunk's KV exactly as
:meth:`kvaas.connector.attach.PagedLoader.load` stages a decoded chunk: keys ``[layers, kv_heads,
chunk_tokens, head_dim]`` and values ``[layers, chunk_tokens, kv_heads, head_dim]``, in the
engine's dtype on the KV's device. A load copies the leading chunks it finds here into its
staging buffer (one ``copy_`` each: no fetch, no verification, no decode) and fetches the rest
from the store. The tier has its own byte budget (``decoded_bytes`` in
``kv_connector_extra_config``, else ``$KVAAS_CONNECTOR_DECODED_BYTES``, else
:data:`DEFAULT_DECODED_BYTES`; ``0`` turns it off) and evicts the least recently used chunks.

Promotion never runs on a request's path: after a load, the chunks that came from the store
(already opened and verified by it) are handed to a :class:`Promoter`, whose one background
thread decodes them into fresh tensors and inserts them. Its queue is bounded in bytes; a
chunk that does not fit is dropped (it is promoted by a later load). A load never waits for it.

What may be served from here: a key names one chunk's contents (keys are content addressed
within a tenant's secret namespace, model fingerprint and scheme, see :mod:`kvaas.store.keys`),
and a decoded chunk is used only for a destination of its exact shape and dtype. It is not
opened again with the plan's keys: it was opened, under the same key, by the load that fetched
it (the key itself derives from the tenant's secret, so no other tenant's plan names it). Whether a
chunk is loaded at all is still decided by the scheduler, which plans only chunks the store
holds: a deleted cache is never served from this tier (exactly as for the worker's memory tier
of sealed blobs). The tier is cleared when the connector shuts down.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvaas import codec
from kvaas.connector import byte_budget
from kvaas.connector.chunks import ChunkShape
from kvaas.store.keys import ChunkKey

log = logging.getLogger("kvaas.connector")

#: environment variable read when ``kv_connector_extra_config`` has no ``decoded_bytes``
DECODED_BYTES_ENV = "KVAAS_CONNECTOR_DECODED_BYTES"
DEFAULT_DECODED_BYTES = 256 * 1024 * 1024
#: bytes of blobs the promoter may hold waiting to be decoded (more are dropped)
DEFAULT_PENDING_BYTES = 32 * 1024 * 1024


def decoded_bytes(extra: Mapping[str, Any] | None) -> int:
    """The decoded tier's budget of a connector: ``extra["decoded_bytes"]`` when present, else
    ``$KVAAS_CONNECTOR_DECODED_BYTES``, else :data:`DEFAULT_DECODED_BYTES`; ``0`` turns the
    tier off. ``ValueError`` on a value that is not an integer >= 0."""
    return byte_budget(extra, "decoded_bytes", DECODED_BYTES_ENV, DEFAULT_DECODED_BYTES)


@dataclass(frozen=True, slots=True)
class DecodedChunk:
    """One decoded chunk: keys ``[layers, kv_heads, tokens, head_dim]`` and values ``[layers,
    tokens, kv_heads, head_dim]``, both dense, of one dtype and device."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def fits(self, shape: ChunkShape) -> bool:
        """Whether this chunk is what a destination of ``shape`` needs (shape and dtype)."""
        k = (shape.num_layers, shape.kv_heads, shape.num_tokens, shape.head_dim)
        v = (shape.num_layers, shape.num_tokens, shape.kv_heads, shape.head_dim)
        return (
            tuple(self.keys.shape) == k
            and tuple(self.values.shape) == v
            and self.keys.dtype == shape.dtype
            and self.values.dtype == shape.dtype
        )


def decode_chunk(blob: bytes, shape: ChunkShape, device: torch.device) -> DecodedChunk | None:
    """``blob`` (a codec container verified by the store) decoded into fresh tensors on
    ``device``, or ``None`` when it does not fit ``shape`` or does not decode. Never raises for
    a blob's contents."""
    try:
        if shape.mismatch(codec.inspect(blob)) is not None:
            return None
        kw: dict[str, Any] = {"dtype": shape.dtype, "device": device}
        L, T, H, D = shape.num_layers, shape.num_tokens, shape.kv_heads, shape.head_dim
        keys, values = torch.empty(L, H, T, D, **kw), torch.empty(L, T, H, D, **kw)
        codec.decode_into(blob, keys, values.transpose(1, 2), verified=True)
        if device.type == "cuda":  # pragma: no cover - needs a GPU
            # published to loads on any stream: its values must be there, not queued
            torch.cuda.current_stream(device).synchronize()
    except Exception:  # a chunk's bytes must never crash the worker
        return None
    return DecodedChunk(keys, values)


class DecodedChunks:
    """An LRU of chunk key -> :class:`DecodedChunk` within ``budget_bytes`` (the tensors'
    bytes). Thread-safe: the step thread reads, the promoter's thread inserts."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._chunks: OrderedDict[ChunkKey, DecodedChunk] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        """Bytes of the chunks held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, key: object) -> bool:
        return key in self._chunks

    def get(self, key: ChunkKey) -> DecodedChunk | None:
        """The chunk under ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is not None:
                self._chunks.move_to_end(key)
            return chunk

    def prefix(self, keys: Sequence[ChunkKey], shape: ChunkShape) -> list[DecodedChunk]:
        """The chunks of the longest leading run of ``keys`` held here and fitting ``shape``
        (each now recently used)."""
        out: list[DecodedChunk] = []
        with self._lock:
            for key in keys:
                chunk = self._chunks.get(key)
                if chunk is None or not chunk.fits(shape):
                    break
                self._chunks.move_to_end(key)
                out.append(chunk)
        return out

    def put(self, key: ChunkKey, chunk: DecodedChunk) -> bool:
        """Insert (or replace) ``key``, evicting the least recently used chunks until the
        budget holds; a chunk larger than the whole budget is not kept. Whether it was kept."""
        size = chunk.nbytes
        with self._lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.budget_bytes:
                return False
            while self._chunks and self._bytes + size > self.budget_bytes:
                _, gone = self._chunks.popitem(last=False)
                self._bytes -= gone.nbytes
            self._chunks[key] = chunk
            self._bytes += size
            return True

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._bytes = 0


class Promoter:
    """Decodes chunks into a :class:`DecodedChunks` on one background thread (started on the
    first submit). :meth:`submit` never blocks: what would take the pending blobs past
    ``pending_bytes`` is dropped."""

    def __init__(
        self,
        tier: DecodedChunks,
        device: torch.device,
        pending_bytes: int = DEFAULT_PENDING_BYTES,
    ) -> None:
        self.tier = tier
        self.device = device
        self.pending_bytes = pending_bytes
        self.dropped = 0  # chunks dropped because the queue was full
        self._queue: deque[tuple[ChunkKey, bytes, ChunkShape]] = deque()
        self._queued = 0  # bytes of the blobs queued
        self._busy = False  # the thread is decoding a chunk taken off the queue
        self._closed = False
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, items: Sequence[tuple[ChunkKey, bytes]], shape: ChunkShape) -> int:
        """Queue ``items`` (key, verified blob of ``shape``) for promotion, skipping keys the
        tier already holds; returns how many were queued."""
        n = 0
        with self._cv:
            if self._closed:
                return 0
            for key, blob in items:
                if key in self.tier:
                    continue
                if self._queued + len(blob) > self.pending_bytes:
                    self.dropped += 1
                    continue
                self._queue.append((key, blob, shape))
                self._queued += len(blob)
                n += 1
            if n:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="kvaas-promote", daemon=True
                    )
                    self._thread.start()
                self._cv.notify_all()
        return n

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                key, blob, shape = self._queue.popleft()
                self._queued -= len(blob)
                self._busy = True
            try:
                if key not in self.tier:
                    chunk = decode_chunk(blob, shape, self.device)
                    if chunk is not None:
                        self.tier.put(key, chunk)
            except Exception as e:  # never let the thread die on one chunk
                log.warning("promoting a chunk into the decoded tier failed: %s", e)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued chunk is promoted (or dropped); whether it was in time.
        For tests and benchmarks: a load never calls it."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        """Stop the thread (the chunk being decoded finishes), drop the queue."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._queued = 0
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
