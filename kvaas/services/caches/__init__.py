"""The cache service: create a cache (prefill + store), extend it by versions, attach it, tag
it, and keep its lifecycle.

Create: tokenize, compute the chunk keys in the tenant's namespace, check the tenant's quotas
and insert the cache row and its version 1 (``pending``), then run the prefill: store the
manifest (taking chunk references *before* any chunk is written, so garbage collection can
never delete them), run the engine with a ``save`` plan, check that every chunk reached the
store and mark the cache ``ready`` (or ``failed`` with a reason, releasing its references).
With ``wait=False`` the prefill runs in a background task the service owns (:meth:`drain`
waits for them, then cancels the rest and marks their caches ``failed``).

Extend: version ``n + 1`` holds version ``n``'s tokens followed by new ones. Its chunk keys
chain from the same parents, so its first chunks *are* version ``n``'s: the engine loads them
from the store (``save`` plan with ``skip``), computes only the new tokens and writes only the
new chunks. Each version has its own manifest; versions share chunks through the store's
reference counts, and the cache's ``stored_bytes`` counts each chunk once.

Attach: the version's tokens come first, the request's after them; the engine runs with a
``load`` plan for the chunks the store still holds. The result says whether the cache was hit
and, if not, why: ``too_short`` (the cache is shorter than one chunk), ``evicted`` (chunks are
gone from every tier), ``load_failed`` (a chunk could not be read or verified; the engine
recomputed it). ``require_hit`` turns a miss into ``409 cache_miss``.

A cache that is deleted or past ``expires_at`` is ``404`` for everyone: to its owner and to
any other tenant alike, with the same message.

**Transitions.** Every change of a cache's lifecycle is committed by exactly one method, in one
transaction, so bookkeeping that must follow it (usage metering) belongs inside that method:
``_begin_create`` / ``_begin_extend`` (rows inserted, quota reserved), ``_complete`` (a version
became ready: create or extend done), ``_fail``, ``_record_hit`` (attach),
``_set_storage_class``, ``_set_fields``, ``_delete_version``, ``_delete``, ``_expire``.
Each status change is a conditional ``UPDATE ... WHERE status IN (...)`` whose row count says
whether it happened (a competing transition committed meanwhile is never overwritten), taken
without holding a lock across store or engine I/O; quota checks and the inserts they allow run
under :class:`~kvaas.services.quotas.Guard` (the tenant's row held for writing, SQLite
included). A transition that retires stored versions records their release in the outbox
(:mod:`kvaas.services.outbox`) in its own transaction; the release is carried out after the
commit, or by the maintenance loop's drain. A pending version holds a lease its gateway
renews; the sweep fails it once the lease has run out.

**Modules.** ``records`` (specs, results, errors), ``identity`` (token bytes, chunk keys, prefill
jobs), ``core`` (collaborators, lookups, fail/expire/retire and the releases they owe), and one
module per group of operations: ``creation`` (create, extend, background prefills), ``attach``,
``lifecycle`` (update, delete, versions, tags, sweep). :class:`CacheService` puts the operations
together.
"""

from __future__ import annotations

from kvaas.services.caches.attach import AttachOps
from kvaas.services.caches.creation import CreateOps
from kvaas.services.caches.identity import bytes_to_tokens, tokens_to_bytes
from kvaas.services.caches.lifecycle import LifecycleOps
from kvaas.services.caches.records import (
    NOT_FOUND,
    SHUTDOWN_REASON,
    STALE_REASON,
    TAG_NOT_FOUND,
    UNSET,
    AttachOutcome,
    CacheMiss,
    CachePatch,
    CacheRef,
    CreateResult,
    CreateSpec,
    Progress,
)
from kvaas.services.prompts import EngineUnavailable, Prompt

__all__ = [
    "NOT_FOUND",
    "SHUTDOWN_REASON",
    "STALE_REASON",
    "TAG_NOT_FOUND",
    "UNSET",
    "AttachOutcome",
    "CacheMiss",
    "CachePatch",
    "CacheRef",
    "CacheService",
    "CreateResult",
    "CreateSpec",
    "EngineUnavailable",
    "Progress",
    "Prompt",
    "bytes_to_tokens",
    "tokens_to_bytes",
]


class CacheService(CreateOps, AttachOps, LifecycleOps):
    """Cache operations over the metadata database, the store and the engine."""
