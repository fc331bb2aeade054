"""Prometheus metrics of the KV store (default registry, label ``tier`` = the tier's name)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BYTES_USED = Gauge(
    "kvaas_store_bytes_used", "Bytes of chunk blobs held by a tier (last observed).", ["tier"]
)
TIER_UP = Gauge("kvaas_store_tier_up", "1 while a tier is reachable, 0 while it is down.", ["tier"])
HITS = Counter("kvaas_store_hits_total", "Chunks found (and verified) in a tier.", ["tier"])
MISSES = Counter("kvaas_store_misses_total", "Chunks looked up in a tier and not found.", ["tier"])
PROMOTIONS = Counter(
    "kvaas_store_promotions_total", "Chunks copied up into a tier after a lower-tier hit.", ["tier"]
)
DEMOTIONS = Counter(
    "kvaas_store_demotions_total",
    "Chunks moved down out of a tier (eviction of live data, idle demotion, class change).",
    ["tier"],
)
EVICTIONS = Counter(
    "kvaas_store_evictions_total", "Chunks removed from a full tier to make room.", ["tier"]
)
CORRUPT_READS = Counter(
    "kvaas_store_corrupt_reads_total",
    "Blobs that failed verification on read: checksum, or authentication of a sealed chunk "
    "(altered, or moved under another key); reported as misses and removed.",
    ["tier"],
)
FOREIGN_SEALS = Counter(
    "kvaas_store_foreign_seal_reads_total",
    "Sealed chunks read without the key they were sealed under (unknown key id, another key "
    "under the same id, another tenant's key); reported as misses and left in place.",
    ["tier"],
)
ERRORS = Counter(
    "kvaas_store_errors_total", "Tier operations that failed, by operation.", ["tier", "op"]
)
#: Histogram buckets of the data path's latencies (seconds): tens of microseconds (a memory
#: hit, one decrypt) to seconds (a slow tier), for the store's operations and the connector's
#: load stages alike.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
LATENCY = Histogram(
    "kvaas_store_op_seconds",
    "Latency of one (batched) tier operation.",
    ["tier", "op"],
    buckets=LATENCY_BUCKETS,
)
GC_DELETED = Counter(
    "kvaas_store_gc_chunks_deleted_total", "Unreferenced chunks deleted by garbage collection."
)
FULL_RETRIES = Counter(
    "kvaas_store_full_retries_total",
    "Writes a tier refused for lack of space (ENOSPC, budget) that were retried once after "
    "freeing room.",
    ["tier"],
)
INDEX_RESERVE_RELEASED = Counter(
    "kvaas_store_index_reserve_released_total",
    "Times the SQLite chunk index gave up its reserve file so that releases could commit on a "
    "full disk.",
)
MAINTENANCE_ROUNDS = Counter(
    "kvaas_store_maintenance_rounds_total",
    "Rounds of the store's maintenance loops, by job and outcome (ok, failed).",
    ["job", "outcome"],
)
