"""Manifests: what a cache version is made of.

A :class:`Manifest` lists a cache version's ordered chunk keys and what is needed to use them
(token count, chunk size, scheme, model fingerprint, storage class). It is stored with the chunks
(in Redis when the store has a Redis tier, else in the SQLite index next to the disk tier) by a
:class:`~kvaas.store.refs.RefIndex`, which also keeps the per-chunk reference counts that let
versions share chunks. The JSON form is canonical (sorted keys, no spaces): storing the same
manifest twice is recognised as the same.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kvaas.store.keys import (
    KEY_BYTES,
    SLOT_BYTES,
    ChunkKey,
    key_from_hex,
    stored_chunks,
    tokens_in_chunks,
)
from kvaas.store.policy import StorageClass, check_storage_class

_CACHE_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_SLOT = re.compile(r"^[0-9a-f]{%d}$" % (2 * SLOT_BYTES))  # noqa: UP031
FORMAT = 1


@dataclass(frozen=True, slots=True)
class Manifest:
    """One immutable cache version.

    ``chunk_keys`` name the version's chunks in order; ``token_count`` is its full token count.
    Every chunk holds ``chunk_tokens`` tokens except, when the keys name one more chunk than
    the full ones, the last: the trailing ``token_count % chunk_tokens`` tokens (manifests
    written before partial chunks were stored name full chunks only).
    ``shards``: the pieces each chunk is stored as, one per rank of a parallel engine (each
    chunk's shard keys in a row, :func:`~kvaas.store.keys.shard_keys`); 1 without parallelism.
    Every key must carry ``namespace_slot`` (all chunks of a manifest belong to one tenant).
    ``bytes_per_tier`` is informational, as measured by the writer (see ``TieredStore.usage``
    for current numbers).
    """

    cache_id: str
    version: int
    namespace_slot: str
    chunk_keys: tuple[ChunkKey, ...]
    token_count: int
    chunk_tokens: int
    scheme: str
    model_fingerprint: str
    storage_class: StorageClass = "standard"
    bytes_per_tier: Mapping[str, int] = field(default_factory=dict)
    created_at: float = field(default_factory=lambda: round(time.time(), 3))
    shards: int = 1

    def __post_init__(self) -> None:
        if not _CACHE_ID.match(self.cache_id):
            raise ValueError(f"invalid cache id {self.cache_id!r} (1-128 of [A-Za-z0-9_.-])")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"version must be a non-negative int, got {self.version!r}")
        if not _SLOT.match(self.namespace_slot):
            raise ValueError(f"invalid namespace slot {self.namespace_slot!r}")
        check_storage_class(self.storage_class)
        if self.chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise ValueError(f"shards must be a positive int, got {self.shards!r}")
        if len(self.chunk_keys) % self.shards:
            raise ValueError(f"{len(self.chunk_keys)} keys are not {self.shards} per chunk")
        if self.chunks > stored_chunks(self.token_count, self.chunk_tokens):
            raise ValueError(
                f"token_count {self.token_count} cannot fill {self.chunks} chunks of "
                f"{self.chunk_tokens} tokens"
            )
        slot = bytes.fromhex(self.namespace_slot)
        object.__setattr__(self, "chunk_keys", tuple(self.chunk_keys))
        for k in self.chunk_keys:
            if len(k) != KEY_BYTES or k[:SLOT_BYTES] != slot:
                raise ValueError("every chunk key must be 32 bytes and carry the namespace slot")
        object.__setattr__(self, "bytes_per_tier", dict(self.bytes_per_tier))

    def to_json(self) -> bytes:
        """Canonical JSON bytes (what is stored)."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "cache_id": self.cache_id,
            "version": self.version,
            "namespace_slot": self.namespace_slot,
            "chunk_keys": [k.hex() for k in self.chunk_keys],
            "token_count": self.token_count,
            "chunk_tokens": self.chunk_tokens,
            "scheme": self.scheme,
            "model_fingerprint": self.model_fingerprint,
            "storage_class": self.storage_class,
            "bytes_per_tier": dict(sorted(self.bytes_per_tier.items())),
            "created_at": self.created_at,
        }
        if self.shards != 1:  # absent for one: manifests written before it read the same
            doc["shards"] = self.shards
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        """Parse :meth:`to_json` output; raises ``ValueError`` on anything else."""
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise ValueError(f"unsupported manifest format {doc.get('format')!r}")
            return cls(
                cache_id=doc["cache_id"],
                version=doc["version"],
                namespace_slot=doc["namespace_slot"],
                chunk_keys=tuple(key_from_hex(h) for h in doc["chunk_keys"]),
                token_count=doc["token_count"],
                chunk_tokens=doc["chunk_tokens"],
                scheme=doc["scheme"],
                model_fingerprint=doc["model_fingerprint"],
                storage_class=doc["storage_class"],
                bytes_per_tier=doc["bytes_per_tier"],
                created_at=doc["created_at"],
                shards=doc.get("shards", 1),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed manifest: {e}") from e

    def with_storage_class(self, storage_class: StorageClass) -> Manifest:
        return replace(self, storage_class=check_storage_class(storage_class))

    @property
    def chunks(self) -> int:
        """Chunks stored (each as :attr:`shards` pieces)."""
        return len(self.chunk_keys) // self.shards

    @property
    def stored_tokens(self) -> int:
        """Tokens covered by the stored chunks (the partial last one's included)."""
        return tokens_in_chunks(self.token_count, self.chunk_tokens, self.chunks)
