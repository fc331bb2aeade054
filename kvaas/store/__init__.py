"""The tiered KV store: chunk identity, storage tiers (memory, Redis, disk), manifests with
reference counts, garbage collection and integrity checks. Never imports the web stack or
SQLAlchemy: it also runs inside vLLM worker processes.

Typical use::

    store = build_store(StoreConfig.from_settings(settings))
    await store.open()
    keys = chunk_keys(tokens, namespace=ns, model_fingerprint=fp, scheme_id=codec)
    sealer = ChunkSealer(master_keys.tenant_keys(ns), fp, manifest.scheme)  # see crypto
    await store.put_manifest(manifest)            # references first
    await store.put_chunks(list(zip(keys, blobs)), manifest.storage_class, sealer)
    blobs = await store.get_prefix(keys, sealer)  # verified blobs of the longest prefix
"""

from kvaas.store.crypto import ChunkSealer, ForeignSeal, MasterKeys, SealError, TenantKeys
from kvaas.store.disk import DiskTier
from kvaas.store.errors import (
    BlobTooLarge,
    ConfigurationError,
    ManifestConflict,
    ManifestNotFound,
    StorageFull,
    StoreError,
    TierUnavailable,
)
from kvaas.store.factory import StoreConfig, build_store
from kvaas.store.keys import (
    DEFAULT_CHUNK_TOKENS,
    KEY_BYTES,
    ChunkKey,
    chunk_keys,
    derive_namespace,
    key_from_hex,
    key_slot,
    longest_stored_prefix,
    namespace_slot,
    partial_tokens,
    stored_chunks,
    tokens_in_chunks,
    trailing_tokens,
    validate_chunk_tokens,
)
from kvaas.store.maintenance import MaintenanceConfig, StoreMaintenance
from kvaas.store.manifest import Manifest
from kvaas.store.memory import MemoryTier
from kvaas.store.policy import (
    DEFAULT_PLACEMENT,
    STORAGE_CLASSES,
    EvictionPolicy,
    LRUPolicy,
    Placement,
    SizeAwarePolicy,
    StorageClass,
)
from kvaas.store.presence import ChunkPresence
from kvaas.store.redis_conn import RedisConnection
from kvaas.store.redis_tier import RedisTier
from kvaas.store.refs import GCResult, RefCounts, RefIndex
from kvaas.store.refs_redis import RedisRefIndex
from kvaas.store.refs_sqlite import SqliteRefIndex
from kvaas.store.sync import SyncTieredStore
from kvaas.store.tier import Tier, TierHealth
from kvaas.store.tiered import TieredStore

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_PLACEMENT",
    "KEY_BYTES",
    "STORAGE_CLASSES",
    "BlobTooLarge",
    "ChunkKey",
    "ChunkPresence",
    "ChunkSealer",
    "ConfigurationError",
    "DiskTier",
    "EvictionPolicy",
    "ForeignSeal",
    "GCResult",
    "LRUPolicy",
    "MaintenanceConfig",
    "Manifest",
    "ManifestConflict",
    "ManifestNotFound",
    "MasterKeys",
    "MemoryTier",
    "Placement",
    "RedisConnection",
    "RedisRefIndex",
    "RedisTier",
    "RefCounts",
    "RefIndex",
    "SealError",
    "SizeAwarePolicy",
    "SqliteRefIndex",
    "StorageClass",
    "StorageFull",
    "StoreConfig",
    "StoreError",
    "StoreMaintenance",
    "SyncTieredStore",
    "TenantKeys",
    "Tier",
    "TierHealth",
    "TierUnavailable",
    "TieredStore",
    "build_store",
    "chunk_keys",
    "derive_namespace",
    "key_from_hex",
    "key_slot",
    "longest_stored_prefix",
    "namespace_slot",
    "partial_tokens",
    "stored_chunks",
    "tokens_in_chunks",
    "trailing_tokens",
    "validate_chunk_tokens",
]
