"""A short-lived, per-process memory of API keys that authenticated.

Resolving a key (:func:`kvaas.auth.resolver.resolve`) is a database query, and on a busy
gateway it is the largest share of what a small request costs. :class:`AuthCache` keeps each
*successful* resolution for ``ttl_s`` seconds, keyed by a SHA-256 of the presented credential
(never the credential itself), so a client sending many requests pays one lookup every
``ttl_s`` seconds instead of one per request.

Contract:

- Only :class:`~kvaas.auth.resolver.AuthContext` results are kept. A credential that did not
  authenticate (missing, malformed, unknown, revoked, disabled tenant) is resolved again on
  every request: a key created a moment ago works at once, and failures stay counted and
  rate-limited per client address as before.
- A lookup that was under way when the cache was cleared is answered but not kept, so a
  revocation cannot be undone by a query that read the key just before it.
- Revoking a key, disabling or enabling a tenant, or changing a tenant's limits through
  :mod:`kvaas.auth.tenancy` calls :func:`invalidate`, which empties every cache of the process
  at once. Another gateway process keeps its entries until they expire: there a revoked key
  stops working within ``ttl_s`` seconds (``KVAAS_AUTH_CACHE_SECONDS``; 0 turns the cache off).
- The application clears the cache whenever the metadata database is found unreachable
  (:meth:`kvaas.db.session.Database.on_outage`): during an outage every request needs the
  database and answers 503, whether or not its key was remembered.
- Entries are resolved in a session of their own that is closed before they are kept, so the
  key and tenant objects are detached with every column loaded; requests share them read-only
  (the one write, the key's ``last_used_at`` kept by ``touch``, is idempotent).
- At most ``max_entries`` credentials are remembered (least recently used dropped first).
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections import OrderedDict
from typing import Any

from kvaas.auth.resolver import AuthContext, Resolution, resolve
from kvaas.db.session import Database

_LIVE: weakref.WeakSet[AuthCache] = weakref.WeakSet()


def invalidate() -> None:
    """Forget every remembered key in this process (after a revocation or a tenant change)."""
    for cache in list(_LIVE):
        cache.clear()


class AuthCache:
    """Successful resolutions of recent credentials, each for ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        if ttl_s < 0 or max_entries < 1:
            raise ValueError("ttl_s must be >= 0 and max_entries >= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[float, AuthContext]] = OrderedDict()
        self._generation = 0  # bumped by every clear: a lookup that began before is not kept
        _LIVE.add(self)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    @property
    def generation(self) -> int:
        return self._generation

    def get(self, credential: str) -> AuthContext | None:
        """The remembered caller of ``credential`` if its entry has not expired."""
        name = hashlib.sha256(credential.encode()).digest()
        entry = self._entries.get(name)
        if entry is None:
            return None
        if time.monotonic() >= entry[0]:
            del self._entries[name]
            return None
        self._entries.move_to_end(name)
        return entry[1]

    def put(self, credential: str, context: AuthContext, generation: int | None = None) -> None:
        """Remember ``context`` for ``credential``, unless the cache was cleared since
        ``generation`` (the value of :attr:`generation` when its lookup began)."""
        if self.ttl_s <= 0 or (generation is not None and generation != self._generation):
            return
        name = hashlib.sha256(credential.encode()).digest()
        self._entries[name] = (time.monotonic() + self.ttl_s, context)
        self._entries.move_to_end(name)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def resolve(self, db: Database, credential: str | None) -> Resolution:
        """The caller presenting ``credential``: remembered, or resolved in a session of its
        own (and remembered when it authenticates)."""
        if credential is not None:
            known = self.get(credential)
            if known is not None:
                return known
        generation = self._generation
        async with db.session() as session:
            resolution = await resolve(session, credential)
        if credential is not None and isinstance(resolution, AuthContext):
            self.put(credential, resolution, generation)
        return resolution


async def resolve_cached(
    state: Any, credential: str | None, db: Database | None = None
) -> Resolution:
    """The caller presenting ``credential``, through the application's ``auth_cache`` (set on
    ``state`` by the application; without one every request is looked up). ``db`` defaults to
    ``state.db``."""
    db = db if db is not None else state.db
    cache: AuthCache | None = getattr(state, "auth_cache", None)
    if cache is None:
        async with db.session() as session:
            return await resolve(session, credential)
    return await cache.resolve(db, credential)
