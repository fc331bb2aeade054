"""The scheduler's memory of chunks it recently found stored: lookups without I/O.

vLLM asks the scheduler side how many of a request's tokens the connector can load
(``get_num_new_matched_tokens``) before every scheduling attempt of a waiting request, and a
popular cache is attached by many requests; each answer costs a batched existence check in
Redis and on disk. :class:`PresenceCache` remembers keys found present for ``ttl_s`` seconds,
so that a lookup whose keys were all seen recently does no I/O, and a lookup asks the store
only for the keys after the leading run it remembers.

Staleness: only *presence* is remembered, never absence (a chunk saved a moment ago is seen
by the next lookup). A remembered chunk may have left the store since (evicted, collected):
the scheduler then promises tokens the worker cannot load; the worker reports those blocks
failed and vLLM recomputes them (``kv_load_failure_policy = "recompute"``). That costs the
recompute, never wrong KV: every chunk is still verified on load. ``ttl_s`` bounds how long
such a promise can outlive its chunk; ``0`` turns the memory off.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvaas.store.keys import ChunkKey

#: Seconds a chunk found present is remembered (default of ``presence_ttl_s`` in the
#: connector's extra config).
DEFAULT_TTL_S = 2.0
#: Keys remembered at most (oldest forgotten first).
DEFAULT_MAX_KEYS = 65536


class PresenceCache:
    """Keys recently found present, each until ``ttl_s`` after it was last confirmed."""

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s < 0 or max_keys < 1:
            raise ValueError("ttl_s must be >= 0 and max_keys >= 1")
        self.ttl_s, self.max_keys, self._clock = ttl_s, max_keys, clock
        self._until: OrderedDict[ChunkKey, float] = OrderedDict()

    def leading(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading ``keys`` are remembered as present."""
        now = self._clock()
        for i, k in enumerate(keys):
            until = self._until.get(k)
            if until is None or until <= now:
                return i
        return len(keys)

    def remember(self, keys: Sequence[ChunkKey]) -> None:
        """Record ``keys`` as found present now."""
        if self.ttl_s <= 0:
            return
        until = self._clock() + self.ttl_s
        for k in keys:
            self._until[k] = until
            self._until.move_to_end(k)
        while len(self._until) > self.max_keys:
            self._until.popitem(last=False)

    def forget(self, keys: Sequence[ChunkKey]) -> None:
        """Drop ``keys`` (e.g. a load found them missing)."""
        for k in keys:
            self._until.pop(k, None)

    def __len__(self) -> int:
        return len(self._until)
