"""A synchronous facade over :class:`~kvaas.store.tiered.TieredStore` for plain threads.

vLLM worker processes call the store from their own (non-asyncio) threads. A
:class:`SyncTieredStore` runs a private event loop on a daemon thread; each method submits the
matching coroutine to that loop and blocks until it finishes. Every store operation therefore
runs on the one loop thread, which keeps the store single-threaded while any number of caller
threads use the facade at once. One read is served on the caller's thread: a prefix held
entirely by the memory tier (see :meth:`SyncTieredStore.get_prefix`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from kvaas.store.crypto import ChunkSealer
from kvaas.store.errors import StoreError
from kvaas.store.factory import StoreConfig, build_store
from kvaas.store.keys import ChunkKey
from kvaas.store.manifest import Manifest
from kvaas.store.refs import GCResult
from kvaas.store.tier import TierHealth
from kvaas.store.tiered import StageTimes, TieredStore, TierHits

T = TypeVar("T")


class SyncTieredStore:
    """Blocking methods with the names and arguments of :class:`TieredStore`'s.

    ``timeout_s`` bounds each call (``None``: no bound); on timeout the operation is cancelled
    and :class:`~kvaas.store.errors.StoreError` is raised. Calling from the loop's own thread
    (i.e. from inside a store coroutine) raises ``RuntimeError`` instead of deadlocking.
    """

    def __init__(self, store: TieredStore, *, timeout_s: float | None = 300.0) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run_loop, name="kvaas-store-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: StoreConfig | dict[str, Any], **kwargs: Any) -> SyncTieredStore:
        """Build (:func:`~kvaas.store.factory.build_store`) and open a store; ``cfg`` may be a
        :meth:`StoreConfig.to_dict` dict, as passed to another process."""
        if isinstance(cfg, dict):
            cfg = StoreConfig.from_dict(cfg)
        sync = cls(build_store(cfg), **kwargs)
        try:
            sync.open()
        except BaseException:
            sync.close()
            raise
        return sync

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError("SyncTieredStore called from its own event loop thread")
        future = asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self._loop)
        try:
            return future.result(self.timeout_s)
        except FutureTimeout:
            future.cancel()
            raise StoreError(f"store call timed out after {self.timeout_s}s") from None

    # -- the TieredStore API -------------------------------------------------------------------
    def open(self) -> None:
        self._call(self.store.open)

    def exists_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self._call(self.store.exists_many, keys)

    def sizes_many(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        return self._call(self.store.sizes_many, keys)

    def longest_prefix(self, keys: Sequence[ChunkKey]) -> int:
        return self._call(self.store.longest_prefix, keys)

    def get_prefix(
        self,
        keys: Sequence[ChunkKey],
        sealer: ChunkSealer | None = None,
        timed: StageTimes | None = None,
        found: TierHits | None = None,
    ) -> list[bytes]:
        """See :meth:`TieredStore.get_prefix`; ``timed`` and ``found`` are called on the
        store's loop thread (they must not block) or on the caller's.

        When the memory tier holds every chunk (a worker's hot cache), the chunks are read
        and verified on the caller's thread (:meth:`TieredStore.memory_prefix`), without a
        round trip through the loop thread (whose wake-up is what a busy machine delays);
        the eviction policy's bookkeeping is then queued to the loop, not waited for."""
        if not self._closed and threading.current_thread() is not self._thread:
            hit = self.store.memory_prefix(keys, sealer, timed, found)
            if hit is not None:
                chunks, touch = hit
                self._loop.call_soon_threadsafe(touch)
                return chunks
        return self._call(self.store.get_prefix, keys, sealer, timed, found)

    def put_chunks(
        self,
        items: Sequence[tuple[ChunkKey, bytes]],
        storage_class: str,
        sealer: ChunkSealer | None = None,
        *,
        warm: bool = False,
    ) -> int:
        return self._call(self.store.put_chunks, items, storage_class, sealer, warm=warm)

    def put_manifest(self, manifest: Manifest) -> None:
        self._call(self.store.put_manifest, manifest)

    def get_manifest(self, slot: str, cache_id: str, version: int) -> Manifest | None:
        return self._call(self.store.get_manifest, slot, cache_id, version)

    def list_versions(self, slot: str, cache_id: str) -> list[int]:
        return self._call(self.store.list_versions, slot, cache_id)

    def delete_manifest(self, slot: str, cache_id: str, version: int) -> Manifest | None:
        return self._call(self.store.delete_manifest, slot, cache_id, version)

    def set_storage_class(
        self, slot: str, cache_id: str, version: int, storage_class: str
    ) -> Manifest:
        return self._call(self.store.set_storage_class, slot, cache_id, version, storage_class)

    def collect_garbage(
        self, *, grace_s: float = 0.0, limit: int = 1000, lease_s: float = 60.0
    ) -> GCResult:
        return self._call(self.store.collect_garbage, grace_s=grace_s, limit=limit, lease_s=lease_s)

    def demote_idle(self, idle_s: float) -> int:
        return self._call(self.store.demote_idle, idle_s)

    def usage(self) -> dict[str, int]:
        return self._call(self.store.usage)

    def health(self) -> dict[str, TierHealth]:
        return self._call(self.store.health)

    # -- shutdown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the store, stop the loop and join its thread (idempotent, any thread)."""
        with self._close_lock:
            if self._closed:
                return
            try:
                self._call(self._shutdown)
            finally:
                self._closed = True
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
                if not self._thread.is_alive():
                    self._loop.close()

    async def _shutdown(self) -> None:
        await self.store.close()
        await self._loop.shutdown_default_executor()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SyncTieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
