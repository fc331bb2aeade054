"""Chunk identity: token ids → content-addressed chunk keys.

Token ids are cut into chunks of ``chunk_tokens`` tokens. Chunk ``i`` is named by::

    digest_i = blake3(len‖namespace ‖ len‖model_fingerprint ‖ len‖scheme_id ‖ parent ‖ tokens_i)
    key_i    = slot(namespace) ‖ digest_i[:28]          (32 bytes)

where ``parent`` is ``key_{i-1}`` (32 zero bytes for the first chunk), every variable-length
field is prefixed by its little-endian u32 length, and ``tokens_i`` are the chunk's token ids as
little-endian int32 bytes. A prompt's trailing partial chunk (its last
``len % chunk_tokens`` tokens) is named the same way when it is stored (``partial=True``): its
shorter ``tokens_i`` keep its key apart from any full chunk's. The hash is stable across
processes, machines and Python versions (never Python's ``hash``). Because each key folds in
its parent, a key names the whole prefix up to and including its chunk.

``namespace`` comes from a per-tenant secret (:func:`derive_namespace`), so two tenants never
produce the same keys and one tenant cannot compute (probe for) another's. The first
:data:`SLOT_BYTES` bytes of every key are the namespace's *slot prefix*: every chunk, reference
count and manifest of a tenant shares one Redis Cluster hash slot (``kvaas:{<slot>}:...``), so a
prefix lookup or a manifest update touches a single slot. The slot prefix reveals nothing about
the namespace (it is a hash of it).

Sharded engines: with tensor or pipeline parallelism each worker holds only its share of a
chunk's KV (its KV heads, its layers), so each rank stores its own piece under its own *shard
key* (:func:`shard_key`): the chunk key with the rank and world size folded in, keeping the slot
prefix. Rank 0 of a world of one (no parallelism) uses the chunk key itself, so unsharded data
stays readable. A chunk is stored for a world only when every rank's piece is
(:func:`shard_keys` lists them).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType, Protocol

import blake3
import numpy as np

ChunkKey = NewType("ChunkKey", bytes)
"""A 32-byte chunk key (``SLOT_BYTES`` namespace slot, then 28 bytes of blake3 digest)."""

KEY_BYTES = 32
SLOT_BYTES = 4
ROOT_PARENT = b"\x00" * KEY_BYTES
DEFAULT_CHUNK_TOKENS = 256

_NAMESPACE_CONTEXT = "kvaas 2025-01 tenant chunk namespace v1"
_SLOT_CONTEXT = "kvaas 2025-01 namespace slot tag v1"  # fixed: keys derive from it
_SHARD_CONTEXT = "kvaas 2026-11 chunk shard key v1"  # fixed: shard keys derive from it
_INT32 = np.dtype("<i4")


class SupportsExistsMany(Protocol):
    async def exists_many(self, keys: Sequence[ChunkKey]) -> list[bool]: ...


def derive_namespace(tenant_secret: bytes) -> bytes:
    """The 32-byte chunk namespace of a tenant, derived from its secret with blake3's KDF mode.

    The same secret always gives the same namespace; without the secret the namespace (and so
    every chunk key of the tenant) cannot be computed.
    """
    if not isinstance(tenant_secret, bytes | bytearray) or len(tenant_secret) < 16:
        raise ValueError("tenant_secret must be at least 16 bytes")
    return blake3.blake3(bytes(tenant_secret), derive_key_context=_NAMESPACE_CONTEXT).digest()


def namespace_slot_bytes(namespace: bytes) -> bytes:
    """The :data:`SLOT_BYTES`-byte slot every key of ``namespace`` starts with."""
    return blake3.blake3(namespace, derive_key_context=_SLOT_CONTEXT).digest(SLOT_BYTES)


def namespace_slot(namespace: bytes) -> str:
    """The slot of ``namespace`` as hex (what manifests are filed under)."""
    return namespace_slot_bytes(namespace).hex()


def key_slot(key: ChunkKey) -> str:
    """The hex slot of a chunk key."""
    return key[:SLOT_BYTES].hex()


def key_from_hex(text: str) -> ChunkKey:
    """Parse a key written with ``key.hex()``; raises ``ValueError`` on bad input."""
    raw = bytes.fromhex(text)
    if len(raw) != KEY_BYTES:
        raise ValueError(f"a chunk key has {KEY_BYTES} bytes, got {len(raw)}")
    return ChunkKey(raw)


def validate_chunk_tokens(chunk_tokens: int, block_size: int | None = None) -> int:
    """Return ``chunk_tokens`` if valid: a positive int and a multiple of ``block_size``."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if block_size is not None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if chunk_tokens % block_size:
            raise ValueError(
                f"chunk_tokens ({chunk_tokens}) must be a multiple of the engine block size "
                f"({block_size})"
            )
    return chunk_tokens


def _field(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def token_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a contiguous little-endian int32 array (raises on out-of-range ids)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.int32).max):
        raise ValueError("token ids must lie in [0, 2**31)")
    return np.ascontiguousarray(arr, dtype=_INT32)


def chunk_keys(
    tokens: Sequence[int] | np.ndarray,
    *,
    namespace: bytes,
    model_fingerprint: str | bytes,
    scheme_id: str | int,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    block_size: int | None = None,
    partial: bool = False,
) -> list[ChunkKey]:
    """Keys of the chunks of ``tokens``, in order: one per full chunk and, with ``partial``,
    one more for the trailing partial chunk when there is one.

    Without ``partial`` only ``len(tokens) // chunk_tokens`` keys are returned and the trailing
    ``len(tokens) % chunk_tokens`` tokens (see :func:`trailing_tokens`) have none. With it,
    those tokens are named like any chunk (the same hash over their bytes, chained to the last
    full chunk's key); being shorter, their bytes differ from any full chunk's, so the key
    names exactly that partial chunk. ``scheme_id`` names the compression scheme (and its
    parameters when they change the bytes), so one prefix compressed two ways gives two sets
    of keys. ``block_size``, when given, checks that ``chunk_tokens`` is a multiple of the
    engine's block size.
    """
    validate_chunk_tokens(chunk_tokens, block_size)
    if len(namespace) < 16:
        raise ValueError("namespace must be at least 16 bytes (use derive_namespace)")
    arr = token_array(tokens)
    n_full = arr.size // chunk_tokens
    n_tail = arr.size - n_full * chunk_tokens if partial else 0
    if n_full == 0 and n_tail == 0:
        return []
    fp = model_fingerprint.encode() if isinstance(model_fingerprint, str) else model_fingerprint
    base = blake3.blake3(_field(namespace) + _field(bytes(fp)) + _field(str(scheme_id).encode()))
    slot = namespace_slot_bytes(namespace)
    # little-endian int32 bytes of each chunk (blake3 takes byte buffers only)
    raw = arr.view(np.uint8)
    rows = list(raw[: n_full * 4 * chunk_tokens].reshape(n_full, 4 * chunk_tokens))
    if n_tail:
        rows.append(raw[n_full * 4 * chunk_tokens :])
    keys: list[ChunkKey] = []
    parent = ROOT_PARENT
    for row in rows:  # one hash per chunk: each key chains its parent
        h = base.copy()
        h.update(parent)
        h.update(row.data)
        parent = slot + h.digest(KEY_BYTES - SLOT_BYTES)
        keys.append(ChunkKey(parent))
    return keys


def stored_chunks(num_tokens: int, chunk_tokens: int) -> int:
    """Chunks a prompt of ``num_tokens`` is stored as: its full chunks and its trailing
    partial one (the one rule for how many chunks a new cache version holds)."""
    return -(-num_tokens // validate_chunk_tokens(chunk_tokens))


def tokens_in_chunks(num_tokens: int, chunk_tokens: int, chunks: int) -> int:
    """Tokens a prompt of ``num_tokens`` stored as ``chunks`` chunks holds in them (its partial
    last chunk's included when ``chunks`` counts one)."""
    return min(chunks * chunk_tokens, num_tokens)


def partial_tokens(num_tokens: int, chunk_tokens: int, chunks: int) -> int:
    """Tokens of the trailing partial chunk of a prompt of ``num_tokens`` stored as ``chunks``
    chunks; 0 when every chunk is full (a version stored before partial chunks were, or a
    prompt that ends on a chunk boundary)."""
    tail = trailing_tokens(num_tokens, chunk_tokens)
    return tail if tail and chunks > num_tokens // chunk_tokens else 0


def trailing_tokens(num_tokens: int, chunk_tokens: int) -> int:
    """How many tokens at the end of a ``num_tokens`` prompt fall outside every full chunk."""
    return num_tokens % validate_chunk_tokens(chunk_tokens)


async def longest_stored_prefix(store: SupportsExistsMany, keys: Sequence[ChunkKey]) -> int:
    """Number of leading chunks of ``keys`` present in ``store``.

    ``store.exists_many`` answers the whole list in batched calls (for a
    :class:`~kvaas.store.tiered.TieredStore`: one round trip per tier). Presence is not
    integrity: a chunk found here can still turn out corrupt on load, in which case the load
    reports a shorter prefix.
    """
    if not keys:
        return 0
    found = await store.exists_many(keys)
    n = 0
    for hit in found:
        if not hit:
            break
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class ShardRank:
    """One worker's place in a sharded engine: tensor- and pipeline-parallel rank and size."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.pp_rank < self.pp_size):
            raise ValueError(f"invalid shard rank {self}")

    @property
    def world(self) -> int:
        return self.tp_size * self.pp_size

    @classmethod
    def all(cls, tp_size: int = 1, pp_size: int = 1) -> list[ShardRank]:
        """Every rank of a ``tp_size`` by ``pp_size`` world, pipeline stage major."""
        return [cls(t, tp_size, p, pp_size) for p in range(pp_size) for t in range(tp_size)]


def shard_key(key: ChunkKey, rank: ShardRank) -> ChunkKey:
    """The key ``rank``'s piece of chunk ``key`` is stored under: ``key`` itself in a world of
    one, else ``key``'s slot prefix then 28 bytes of a blake3 hash of ``key``, the rank and the
    world size (distinct for every rank and world size, in the key's Redis slot)."""
    if rank.world == 1:
        return key
    h = blake3.blake3(derive_key_context=_SHARD_CONTEXT)
    h.update(bytes(key))
    h.update(struct.pack("<4I", rank.tp_rank, rank.tp_size, rank.pp_rank, rank.pp_size))
    return ChunkKey(bytes(key[:SLOT_BYTES]) + h.digest(KEY_BYTES - SLOT_BYTES))


def shard_keys(keys: Sequence[ChunkKey], tp_size: int = 1, pp_size: int = 1) -> list[ChunkKey]:
    """Every rank's shard key of each of ``keys``, chunk major (``len(keys) * world`` keys;
    ``keys`` themselves in a world of one)."""
    ranks = ShardRank.all(tp_size, pp_size)
    return [shard_key(k, r) for k in keys for r in ranks]
